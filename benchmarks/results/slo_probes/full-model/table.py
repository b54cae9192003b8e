"""The README-format table of an SLO sweep (within T / effective MRR@10, mean over runs, runs in brackets;
the best effective MRR@10 at each rate in bold), every repeated point run by run, and each elastic
server's effective MRR@10 minus the best static level's, in points, rate by rate.

    PYTHONPATH=. python benchmarks/results/slo_probes/full-model/table.py SLO_JSON [T_ms]
"""
import collections
import json
import sys

from benchmarks.slo import label, server_order


def mean(xs) -> float:
    """sum / count, as the README's tables were computed (statistics.mean rounds a hair differently)."""
    xs = list(xs)
    return sum(xs) / len(xs)


def main() -> None:
    T = float(sys.argv[2]) if len(sys.argv) > 2 else 50.0
    rows = [r for r in json.load(open(sys.argv[1])) if r["T_ms"] == T]
    rates = sorted({r["rate_rps"] for r in rows})
    pts = collections.defaultdict(list)  # ((server, level), rate) -> rows
    for r in rows:
        pts[((r["server"], r["level"]), r["rate_rps"])].append(r)
    servers = sorted({k for k, _ in pts}, key=lambda k: (server_order(k[0]), -(k[1] or 0)))
    eff = {k: mean(x["effective_mrr_at_10"] for x in v) for k, v in pts.items()}
    best = {rate: max((e, k) for (k, rt), e in eff.items() if rt == rate and k[0] != "noop")[1] for rate in rates}

    print("| server | " + " | ".join(f"{int(r)}" + (" req/s" if i == 0 else "") for i, r in enumerate(rates)) + " |")
    print("| --- " * (len(rates) + 1) + "|")
    for s in servers:
        cells = []
        for rate in rates:
            v = pts.get((s, rate))
            if not v:
                cells.append("")
                continue
            w, e = mean(x["within_T"] for x in v), eff[(s, rate)]
            fw = f"{w:.4f}" if w >= 0.95 else f"{w:.3f}"
            fe = f"{e:.4f}" if w >= 0.95 else f"{e:.3f}"
            c = fw if s[0] == "noop" else f"{fw} / " + (f"**{fe}**" if best[rate] == s else fe)
            cells.append(c + (f" ({len(v)})" if len(v) > 1 else ""))
        print(f"| {label(*s)} | " + " | ".join(cells) + " |")

    print()
    for (k, rt), v in sorted(pts.items(), key=lambda x: (x[0][1], server_order(x[0][0][0]))):
        if len(v) > 1 and k[0] != "noop":
            print(label(*k), int(rt), [(x["within_T"], round(x["effective_mrr_at_10"], 4), x["shed"], x["mean_level"])
                                       for x in v])

    print()
    for s in servers:
        if s[0].startswith("elastic"):
            diffs = []
            for rate in rates:
                statics = [(e, k) for (k, rt), e in eff.items() if rt == rate and k[0] == "static"]
                if (s, rate) in eff and statics:
                    e_best, k_best = max(statics)
                    diffs.append(f"{int(rate)} {100 * (eff[(s, rate)] - e_best):+.2f} ({label(*k_best)})")
            print(f"{label(*s)} - best static, points:", ", ".join(diffs))


if __name__ == "__main__":
    main()
