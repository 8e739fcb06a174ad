"""Config dataclass fields that carry their help text (the CLI builds one flag per field)."""

from __future__ import annotations

from dataclasses import field
from typing import Any

__all__ = ["option"]


def option(default: Any, help: str, choices: tuple[Any, ...] | None = None) -> Any:
    """A dataclass field with a default, the ``--help`` text of its flag and, optionally, the
    values it may take (listed in ``--help`` and checked by the command line)."""
    return field(default=default, metadata={"help": help, "choices": choices})
