"""Readers for the retrieval data formats (plain or .gz): ``id<TAB>text`` files for queries and
passages, TREC qrels (``qid 0 pid rel``), candidate runs. Errors name the file and line."""

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


def read_run(path: str | Path) -> dict[str, list[str]]:
    """A candidate run -> {qid: [pid, ...]} best first: TREC run format (``qid Q0 pid rank score
    tag``, ordered by score, ties by rank) or the packed ``qid pid rank`` (ordered by rank).

    Raises:
        ValueError: a line with another number of fields or a non-numeric rank or score; an
            empty file.
    """
    rows: dict[str, list[tuple[float, int, str]]] = {}
    with _open(path) as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            try:
                if len(parts) == 6:
                    key = (-float(parts[4]), int(parts[3]), parts[2])
                elif len(parts) == 3:
                    key = (float(parts[2]), 0, parts[1])
                else:
                    raise ValueError
            except ValueError:
                raise ValueError(f"{path}:{n}: expected 'qid Q0 pid rank score tag' or 'qid pid rank'") from None
            rows.setdefault(parts[0], []).append(key)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return {q: [pid for *_, pid in sorted(v)] for q, v in rows.items()}


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


def _is_answer_list(field: str) -> bool:
    field = field.strip().strip('"')  # DPR's files CSV-quote an answer list holding quotes
    return field.startswith("[") and field.endswith("]")


def read_queries(path: str | Path) -> list[str]:
    """Query texts of one unlabeled query file, in file order. Two formats are recognised:

    - ``qid<TAB>query`` (MS MARCO);
    - DPR's ``question<TAB>['answer', ...]`` (NQ, TriviaQA): the question is kept, the
      answers are ignored.

    The format is decided by the first line and every line must follow it.

    Raises:
        FileNotFoundError: no such file.
        ValueError: an empty file, a line without a tab, an empty query, or a line of the other
            format (the message names the file and line).
    """
    out: list[str] = []
    dpr = None
    with _open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            if "\t" not in line:
                raise ValueError(f"{path}:{n}: expected 'qid<TAB>query' or 'question<TAB>[answers]', found no tab")
            a, b = line.split("\t", 1)
            if dpr is None:
                dpr = _is_answer_list(b)
            elif dpr != _is_answer_list(b):
                raise ValueError(f"{path}:{n}: mixes formats: the first line is "
                                 f"{'question<TAB>[answers]' if dpr else 'qid<TAB>query'}, this one is not")
            text = (a if dpr else b).strip()
            if not text:
                raise ValueError(f"{path}:{n}: empty query")
            out.append(text)
    if not out:
        raise ValueError(f"{path}: no rows")
    return out


def normalize_query(text: str) -> str:
    """Lower-cased, whitespace-collapsed form used to find a query in two sets."""
    return " ".join(text.lower().split())


def check_disjoint(train: dict[str, list[str]], held_out: str | Path) -> None:
    """Raise before any training when a held-out (evaluation) query is among the training queries.

    Args:
        train: {file name: query texts} of the training files.
        held_out: the ``qid<TAB>query`` evaluation file.

    Raises:
        ValueError: names the training file, its count of held-out queries and one example qid.
    """
    dev = {normalize_query(t): qid for qid, t in read_tsv(held_out).items()}
    for name, texts in train.items():
        hits = [dev[k] for k in map(normalize_query, texts) if k in dev]
        if hits:
            raise ValueError(f"{name}: holds {len(hits)} queries of the evaluation set {held_out} "
                             f"(e.g. qid {hits[0]}); remove them: evaluation queries are never trained on")


def read_query_files(paths: list[str | Path], held_out: str | Path | None = None) -> list[str]:
    """Every query of ``paths`` (each read by :func:`read_queries`), duplicates across and
    within files dropped (first kept, compared by :func:`normalize_query`).

    Raises:
        FileNotFoundError / ValueError: as :func:`read_queries`; and, when ``held_out`` is given,
            as :func:`check_disjoint` when an evaluation query is among them.
    """
    per_file = {str(p): read_queries(p) for p in paths}
    if held_out is not None:
        check_disjoint(per_file, held_out)
    seen, out = set(), []
    for texts in per_file.values():
        for t in texts:
            k = normalize_query(t)
            if k not in seen:
                seen.add(k)
                out.append(t)
    return out
