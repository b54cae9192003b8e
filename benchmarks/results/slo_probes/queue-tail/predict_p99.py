# Kept as it ran (2026-11-25; not a maintained benchmark): predicted p99 latency C*(2 + x_eps/8) + o/2 of each
# static server of a benchmarks.slo work folder against the measured one, Kingman tail (README here).
#   python benchmarks/results/slo_probes/queue-tail/predict_p99.py runs/demo/slo 50
import json, math, glob, re, numpy as np, sys
T=float(sys.argv[2]) if len(sys.argv)>2 else 50
base=sys.argv[1] if len(sys.argv)>1 else 'runs/demo/slo'
def theta(a,b):
    # solve a(e^th-1)=th*b, a<b
    if a>=b: return None
    th=2*(b-a)/a  # initial
    for _ in range(60):
        f=a*(math.exp(th)-1)-th*b; df=a*math.exp(th)-b
        th2=th-f/df
        if th2<=0: th2=th/2
        if abs(th2-th)<1e-9: th=th2;break
        th=th2
    return th
for l in (5,10,20,30,50):
    dd=glob.glob(f'{base}/static{l}-T{int(T)}')
    if not dd: continue
    d=json.load(open(dd[0]+'/describe_end.json'))
    o=d['overhead_ms']; cm=d['level_corrections'][str(l)]['mean']; t8=d['processing_ms'][str(l)][-1]
    C=cm*t8+o
    for f in sorted(glob.glob(dd[0]+'/raw-*.jsonl'), key=lambda s:(int(re.findall(r'raw-(\d+)',s)[0]),s)):
        rate=int(re.findall(r'raw-(\d+)',f)[0])
        rows=[json.loads(x) for x in open(f)]
        rows=[r for r in rows if r['scheduled_s']>=0]
        lat=np.array([r['latency_ms'] if r['status']==200 else 1e9 for r in rows])
        wt=(lat<=T).mean(); p99=np.percentile(lat,99); p95=np.percentile(lat,95)
        a=rate*C/1000; th=theta(a,8)
        if th:
            pred={e:C*(2+math.log(1/e)/th/8)+0.5*o for e in (0.05,0.01,0.001)}
            ps=f"pred p95 {pred[0.05]:.1f} p99 {pred[0.01]:.1f} p999 {pred[0.001]:.1f}"
        else: ps='unstable'
        print(f"static{l} {rate} rho={a/8:.2f} within={wt:.4f} p95={min(p95,999):.1f} p99={min(p99,999):.1f} | {ps}")
