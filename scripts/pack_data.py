"""Pack the embedded default data from ../shared/data into data/ (run once by a maintainer;
the packed files are committed, with their provenance in data/README.md).

    python scripts/pack_data.py --shared ../shared/data
"""

import argparse
import gzip
import shutil
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shared", type=Path, default=Path("../shared/data"))
    ap.add_argument("--out", type=Path, default=Path("data"))
    a = ap.parse_args()
    src, out = a.shared / "msmarco", a.out / "msmarco"
    out.mkdir(parents=True, exist_ok=True)
    for f in ("queries.dev500.tsv", "qrels.dev500.tsv", "bm25.top20.dev500.tsv"):
        shutil.copy(src / f, out / f)
    keep = {line.split()[1] for line in open(src / "bm25.top20.dev500.tsv")}
    keep |= {line.split()[2] for line in open(src / "qrels.dev500.tsv")}
    n = 0
    with open(src / "collection.sample.tsv") as fi, gzip.open(out / "collection.dev500.tsv.gz", "wt") as fo:
        for line in fi:
            if line.split("\t", 1)[0] in keep:
                fo.write(line)
                n += 1
    tq = a.out / "train-queries"
    tq.mkdir(parents=True, exist_ok=True)
    with open(a.shared / "train-queries" / "msmarco.dev-subset.minus-eval.tsv", "rb") as fi, \
            gzip.open(tq / "msmarco.train.tsv.gz", "wb") as fo:
        shutil.copyfileobj(fi, fo)
    # NQ / TriviaQA questions (DPR's question<TAB>[answers]): the questions only, as id<TAB>query
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from elastic.data import check_disjoint, read_queries

    packed = {}
    for name in ("nq.dev", "nq.test", "trivia.dev", "trivia.test"):
        qs = read_queries(a.shared / "train-queries" / f"{name}.tsv")
        packed[name] = qs
        with gzip.GzipFile(tq / f"{name}.tsv.gz", "wb", mtime=0) as fo:
            fo.write("".join(f"{name}-{i}\t{q}\n" for i, q in enumerate(qs, 1)).encode())
        print(f"{name}.tsv.gz: {len(qs)} questions")
    check_disjoint(packed, out / "queries.dev500.tsv")
    txt = a.out / "text"
    txt.mkdir(parents=True, exist_ok=True)
    for split in ("valid", "test"):
        with open(a.shared / "text" / f"wikitext-2.{split}.tokens", "rb") as fi, \
                gzip.GzipFile(txt / f"wikitext-2.{split}.tokens.gz", "wb", mtime=0) as fo:
            shutil.copyfileobj(fi, fo)
    print(f"collection.dev500.tsv.gz: {n} passages")
    pack_glue(a.shared / "glue", a.out / "glue")


GLUE_FILES = ("SST-2.train.tsv", "SST-2.dev.tsv", "MRPC.train.tsv", "MRPC.dev.tsv", "STS-B.train.tsv",
              "STS-B.dev.tsv", "RTE.train.tsv", "RTE.dev.tsv")


def pack_glue(src: Path, out: Path) -> None:
    """The four GLUE tasks that have a train set (byte-identical, gzip), and STS-B's licence."""
    out.mkdir(parents=True, exist_ok=True)
    for f in GLUE_FILES:
        with open(src / f, "rb") as fi, gzip.GzipFile(out / f"{f}.gz", "wb", mtime=0) as fo:
            shutil.copyfileobj(fi, fo)
    shutil.copy(src / "STS-B.LICENSE.txt", out / "STS-B.LICENSE.txt")
    print(f"glue: {len(GLUE_FILES)} files")


if __name__ == "__main__":
    main()
