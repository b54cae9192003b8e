# Kept as it ran (2026-11-25; not a maintained benchmark). Per raw run of a benchmarks.slo work folder:
# the median model time of the batches of 8 at level 5 (the servers named after the folder; default
# elastic-T50 and static5-T50), and the handler's
# time outside the model per batch size (handler_ms - model_ms; parsing, tokenizing, the schedule).
#   PYTHONPATH=. python benchmarks/results/slo_probes/sweep-c1/batch_times.py runs/demo/runs/demo/runs/sweep-c1/work
#   PYTHONPATH=. python benchmarks/results/slo_probes/sweep-c1/batch_times.py runs/demo/slo
import collections
import glob
import json
import re
import sys

import numpy as np

from benchmarks.way_back import batches

work = sys.argv[1]
for srv in sys.argv[2:] or ("elastic-T50", "static5-T50"):
    for f in sorted(glob.glob(f"{work}/{srv}/raw-*.jsonl"), key=lambda p: [int(x) for x in re.findall(r"(\d+)-(\d)", p)[-1]]):
        recs = [json.loads(line) for line in open(f)]
        recs = [r for r in recs if r["scheduled_s"] >= 0]
        level = {(r["model_ms"], r["handler_ms"]): r["level"] for r in recs if r["status"] == 200}
        bs = batches(recs)
        b8 = [b["model"] for b in bs if len(b["way_back"]) == 8 and level[b["key"]] == 5]
        outside = collections.defaultdict(list)
        for b in bs:
            outside[len(b["way_back"])].append(b["key"][1] - b["key"][0])
        print(srv, f.rsplit("/", 1)[1], "level-5 batches of 8:", len(b8),
              f"median model {np.median(b8):.2f} ms" if b8 else "",
              "| handler outside the model, median ms by batch size:",
              {k: round(float(np.median(v)), 3) for k, v in sorted(outside.items()) if len(v) >= 20})
