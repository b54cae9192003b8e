# Kept as it ran (2026-11-25; not a maintained benchmark): sums what thread_cpu_sampler.py wrote
# (one JSON line per 0.5 s: every thread's CPU seconds of the JVM and of the worker) into CPU
# seconds per group (the JIT's compiler threads, the JVM's other threads, the worker) over the run,
# and the share of the core per group in the first 40 s of load and after.
#   taskset -c 1 python thread_cpu_sampler.py OUT.jsonl SECONDS &   # beside a benchmarks.slo run
#   python thread_cpu.py OUT.jsonl      (or one of samples/*.jsonl.gz: run2/run3, samp3-<mode>-<i> = runs 10-15,
#                                         samp-long-<mode> = runs 16-17 of runs.json)
import collections
import gzip
import json
import sys

snaps = [json.loads(line) for line in (gzip.open if sys.argv[1].endswith(".gz") else open)(sys.argv[1], "rt")]


def group(key: str) -> str:
    kind, _pid, _tid, comm = key.split(":", 3)
    if kind == "java":
        return "JIT" if ("C2" in comm or "C1" in comm) else "java"
    return "worker"


first, last = {}, {}
for s in snaps:
    for k, v in s["th"].items():
        first.setdefault(k, v)
        last[k] = v
total = collections.Counter()
for k, v in last.items():
    total[group(k)] += v  # CPU seconds since the thread started
print("CPU s over the run:", {k: round(v, 1) for k, v in total.items()})
series = []
for a, b in zip(snaps, snaps[1:]):
    d = collections.Counter()
    for k, v in b["th"].items():
        if k in a["th"]:
            d[group(k)] += (v - a["th"][k]) / (b["t"] - a["t"])
    series.append((b["t"], d))
busy = [t for t, d in series if d["java"] > 0.05]
if busy:
    t0 = busy[0]
    for name, lo, hi in (("first 40 s", t0, t0 + 40), ("after", t0 + 40, busy[-1])):
        w = [d for t, d in series if lo <= t < hi]
        if w:
            print(name, {g: round(sum(x[g] for x in w) / len(w), 3) for g in ("worker", "java", "JIT")})
