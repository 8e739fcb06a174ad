"""Config dataclass fields that carry their help text (the CLI builds one flag per field)."""

from __future__ import annotations

from dataclasses import field
from typing import Any

__all__ = ["option"]


def option(default: Any, help: str) -> Any:
    """A dataclass field with a default and the ``--help`` text of its flag."""
    return field(default=default, metadata={"help": help})
