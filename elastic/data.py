"""Readers for the retrieval data formats (plain or .gz): ``id<TAB>text`` files for queries and
passages, TREC qrels (``qid 0 pid rel``). Errors name the file and line."""

from __future__ import annotations

import gzip
from pathlib import Path


def _open(path: Path):
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def read_tsv(path: str | Path) -> dict[str, str]:
    """``id<TAB>text`` lines -> {id: text} in file order (MS MARCO queries and collection).

    Raises:
        ValueError: a line without a tab, an empty text, or an empty file.
    """
    out: dict[str, str] = {}
    with _open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line:
                continue
            if "\t" not in line:
                raise ValueError(f"{path}:{n}: expected 'id<TAB>text', found no tab")
            i, text = line.split("\t", 1)
            if not text.strip():
                raise ValueError(f"{path}:{n}: empty text for id {i!r}")
            out[i.strip()] = text.strip()
    if not out:
        raise ValueError(f"{path}: no rows")
    return out


def read_qrels(path: str | Path) -> dict[str, dict[str, int]]:
    """TREC qrels (``qid 0 pid rel``, spaces or tabs) -> {qid: {pid: rel}}.

    Raises:
        ValueError: a line without four fields or with a non-integer relevance; an empty file.
    """
    out: dict[str, dict[str, int]] = {}
    with _open(path) as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 4 or not parts[3].lstrip("-").isdigit():
                raise ValueError(f"{path}:{n}: expected 'qid 0 pid rel'")
            out.setdefault(parts[0], {})[parts[2]] = int(parts[3])
    if not out:
        raise ValueError(f"{path}: no rows")
    return out


def read_wikitext(path: str | Path, min_words: int = 8) -> list[str]:
    """Paragraphs of a WikiText token file (plain or .gz), lightly detokenized.

    Headings (`` = Title = ``) and lines under ``min_words`` words are skipped; WikiText's
    ``@-@``, ``@,@`` and ``@.@`` joins are undone.

    Raises:
        ValueError: the file has no paragraph (empty, or not WikiText).
    """
    out = []
    with _open(path) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("=") or len(line.split()) < min_words:
                continue
            out.append(line.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", "."))
    if not out:
        raise ValueError(f"{path}: no paragraph of at least {min_words} words (empty or not a WikiText token file)")
    return out
