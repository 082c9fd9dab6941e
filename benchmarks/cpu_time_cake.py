"""CPU-time (not wall-clock) timings of the CAKE/LAKE ops, for shared machines:

    PYTHONPATH=. python benchmarks/cpu_time_cake.py
"""
import time, statistics, torch
torch.set_num_threads(1)
from fastkd.ops import cross_class_contrastive, cross_class_contrastive_reference, langevin_step_
from fastkd.bench.contrastive import naive_contrastive
from fastkd.bench.langevin import eager_step
def cpu_ms(fn, reps=7):
    fn(); ts=[]
    for _ in range(reps):
        t=time.process_time(); fn(); ts.append((time.process_time()-t)*1e3)
    return statistics.median(ts)
for n in (4096, 16384):
    p=torch.randn(n,10,requires_grad=True); y=torch.randint(0,10,(n,))
    def run(f):
        def go():
            p.grad=None; f(p,y).backward()
        return go
    r={"cpp":cpu_ms(run(lambda t,yy: cross_class_contrastive(t,yy,backend="cpp"))),
       "eager closed form":cpu_ms(run(cross_class_contrastive_reference))}
    if n==4096: r["naive eager"]=cpu_ms(run(naive_contrastive),reps=3)
    print("contrastive N=%d K=10:"%n, {k:round(v,2) for k,v in r.items()})
for shape in [(256,3,32,32),(64,3,64,64),(16,3,224,224)]:
    x=torch.randn(shape); g=torch.randn(shape)*0.1
    e=cpu_ms(lambda: eager_step(x,g)); c=cpu_ms(lambda: langevin_step_(x,g,1e-3,clamp=(-3.,3.),backend="cpp"))
    ct=cpu_ms(lambda: langevin_step_(x,g,1e-3,clamp=(-3.,3.),tv_weight=1.0,backend="cpp"))
    print("langevin", shape, "eager %.2f ms, cpp %.2f ms (x%.2f), cpp+TV %.2f ms"%(e,c,e/c,ct))
