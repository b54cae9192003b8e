"""The README-format table of an SLO sweep (within T / effective MRR@10, mean over runs, runs in brackets;
the best effective MRR@10 at each rate in bold), then every repeated point run by run.

    python benchmarks/results/slo_probes/full-model/table.py SLO_JSON [T_ms]
"""
import json, sys, collections
rows=json.load(open(sys.argv[1]))
T=float(sys.argv[2]) if len(sys.argv)>2 else 50
rows=[r for r in rows if r['T_ms']==T]
rates=sorted({r['rate_rps'] for r in rows})
def key(r): return (r['server'], r['level'])
pts=collections.defaultdict(list)
for r in rows: pts[(key(r), r['rate_rps'])].append(r)
servers=[('elastic',None),('elastic-paper',None)]+[('static',l) for l in (50,30,20,10,5)]+[('noop',None)]
best={}
for rate in rates:
    cands=[(sum(x['effective_mrr_at_10'] for x in v)/len(v),k) for (k,rt),v in pts.items() if rt==rate and k[0]!='noop']
    best[rate]=max(cands)[1] if cands else None
print('| server | '+' | '.join(f'{int(r)}' + (' req/s' if i==0 else '') for i,r in enumerate(rates))+' |')
print('| --- '*(len(rates)+1)+'|')
for s in servers:
    name=s[0] if s[1] is None else f'static {s[1]} %'
    cells=[]
    for rate in rates:
        v=pts.get((s,rate))
        if not v: cells.append(''); continue
        w=sum(x['within_T'] for x in v)/len(v); e=sum(x['effective_mrr_at_10'] for x in v)/len(v)
        fw=f'{w:.4f}' if w>=0.95 else f'{w:.3f}'; fe=f'{e:.4f}' if w>=0.95 else f'{e:.3f}'
        if s[0]=='noop': c=fw
        else: c=f"{fw} / {'**'+fe+'**' if best[rate]==s else fe}"
        if len(v)>1: c+=f' ({len(v)})'
        cells.append(c)
    print(f'| {name} | '+' | '.join(cells)+' |')
# per-run detail for elastic and static 5
print()
for (k,rt),v in sorted(pts.items(), key=lambda x:(x[0][1], str(x[0][0]))):
    if len(v)>1 and k[0]!='noop':
        print(k, int(rt), [(x['within_T'], round(x['effective_mrr_at_10'],4), x['shed'], x['mean_level']) for x in v])
