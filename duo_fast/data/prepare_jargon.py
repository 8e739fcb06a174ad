"""Rebuild the bundled demo corpus from the Jargon File 4.4.7 (public domain).

The source is Debian's ``jargon-text`` package (``/usr/share/doc/jargon-text/jargon.txt.gz``,
upstream: Eric S. Raymond's Jargon File, which its copyright notice places in the public
domain). We keep the lexicon entries and the two prose appendices, one document per line,
with typographic quotes folded to ASCII so that a small tokenizer covers them.

    apt-get download jargon-text && dpkg -x jargon-text_*.deb x
    python -m duo_fast.data.prepare_jargon x/usr/share/doc/jargon-text/jargon.txt.gz
"""

from __future__ import annotations

import gzip
import re
import sys
from pathlib import Path

_FOLD = {"\u201c": '"', "\u201d": '"', "\u2018": "'", "\u2019": "'", "\u2014": " -- ",
         "\u2013": "-", "\u00b7": "", "\u2026": "...", "\u00a0": " "}


def _fold(text: str) -> str:
    for a, b in _FOLD.items():
        text = text.replace(a, b)
    text = re.sub(r"\{([^{}]*)\}", r"\1", text)  # {cross-reference} -> cross-reference
    return re.sub(r"\s+", " ", text).strip()


def extract_documents(raw: str) -> list[str]:
    """Split the Jargon File text into documents: one per lexicon entry or appendix paragraph."""
    lines = raw.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.strip().startswith(":(TM):"))
    stop = next((i for i, ln in enumerate(lines) if ln.startswith("Appendix C.")), len(lines))
    docs: list[str] = []
    current: list[str] = []
    paragraph: list[str] = []

    def flush_paragraph() -> None:
        if paragraph:
            current.append(_fold(" ".join(paragraph)))
            paragraph.clear()

    def flush_doc() -> None:
        flush_paragraph()
        body = " ".join(p for p in current if p)
        if len(body.split()) >= 8:
            docs.append(body)
        current.clear()

    for ln in lines[start:stop]:
        s = ln.strip()
        if re.match(r"^:.+:", s) or s.startswith("Appendix "):
            flush_doc()
            paragraph.append(s.strip(":").replace(": ", ": ", 1))
            flush_paragraph()
        elif not s:
            flush_paragraph()
        else:
            paragraph.append(s)
    flush_doc()
    return docs


def main(src: str, dst: str | None = None) -> None:
    raw = gzip.open(src, "rt", encoding="utf-8").read()
    docs = extract_documents(raw)
    out = Path(dst) if dst else Path(__file__).with_name("jargon.txt.gz")
    with gzip.open(out, "wt", encoding="utf-8", compresslevel=9) as f:
        f.write("\n".join(docs) + "\n")
    print(f"{len(docs)} documents, {sum(len(d) for d in docs)} characters -> {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
