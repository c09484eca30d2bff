import sys, time, json, statistics, os, torch
from torch.profiler import profile, ProfilerActivity
import vmrnn.models.ss2d as ss2dmod
from vmrnn.models import build_model
from vmrnn.bench import SHAPES, _frames, time_mode, mode_table
from vmrnn.train.step import ExecutionConfig, make_train_step
from vmrnn.ops import ss2d_scan as fs, selective_scan
OUT = os.environ["OUT"]
res = {}
def timed(fn, warmup=2, iters=5):
    for _ in range(warmup): fn()
    torch.cuda.synchronize(); ts=[]
    for _ in range(iters):
        a,b=torch.cuda.Event(enable_timing=True),torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); b.synchronize(); ts.append(a.elapsed_time(b))
    return statistics.median(ts)
part = sys.argv[1]
if part == "scan":
    for (b,h,w,d) in [(4,64,64,256),(16,32,32,256),(16,16,16,512)]:
        L=h*w; n=16
        u=torch.randn(b,L,d,device="cuda",dtype=torch.bfloat16,requires_grad=True)
        delta=(torch.randn(b,L,4,d,device="cuda")*0.5).bfloat16().requires_grad_(True)
        A=-torch.exp(torch.randn(4*d,n,device="cuda")*0.5).requires_grad_(True)
        Bs=torch.randn(b,L,4,n,device="cuda",dtype=torch.bfloat16,requires_grad=True)
        Cs=torch.randn(b,L,4,n,device="cuda",dtype=torch.bfloat16,requires_grad=True)
        Ds=torch.ones(4*d,device="cuda",requires_grad=True); bias=(torch.zeros(4*d,device="cuda")-2).requires_grad_(True)
        go=torch.randn(b,L,4,d,device="cuda",dtype=torch.bfloat16)
        def tri():
            y=fs.ss2d_scan(u,delta,A,Bs,Cs,Ds,bias,h,w,True,backend="triton"); y.backward(go)
        def trif():
            with torch.no_grad(): fs.ss2d_scan(u,delta,A,Bs,Cs,Ds,bias,h,w,True,backend="triton")
        for nseg in [None, 1, 4, 8, 16, 32, 64]:
            fs.LAUNCH_OVERRIDE.clear()
            if nseg is not None: fs.LAUNCH_OVERRIDE["nseg"]=nseg
            p=fs.scan_plan(b,L,d,n)
            if nseg is not None and p.nseg!=nseg: continue
            f,fb=timed(trif),timed(tri)
            print(f"scan {b}x{h}x{w}x{d} nseg={nseg} plan={tuple(p)} fwd {f:.3f} fwd+bwd {fb:.3f} ms", flush=True)
            res[f"{b}x{h}x{w}x{d}/nseg={nseg}"]=(f,fb)
        fs.LAUNCH_OVERRIDE.clear()
        xs=torch.randn(b,4*d,L,device="cuda",dtype=torch.bfloat16,requires_grad=True)
        dts=torch.randn(b,4*d,L,device="cuda",dtype=torch.bfloat16,requires_grad=True)
        B2=torch.randn(b,4,n,L,device="cuda",dtype=torch.bfloat16,requires_grad=True)
        C2=torch.randn(b,4,n,L,device="cuda",dtype=torch.bfloat16,requires_grad=True)
        def mam():
            y=selective_scan(xs,dts,A,B2,C2,Ds,delta_bias=bias.detach(),delta_softplus=True,backend="cuda"); y.float().sum().backward()
        def mamf():
            with torch.no_grad(): selective_scan(xs,dts,A,B2,C2,Ds,delta_bias=bias.detach(),delta_softplus=True,backend="cuda")
        f,fb=timed(mamf),timed(mam)
        print(f"scan {b}x{h}x{w}x{d} mamba fwd {f:.3f} fwd+bwd {fb:.3f} ms", flush=True)
        res[f"{b}x{h}x{w}x{d}/mamba"]=(f,fb)
        del u,delta,Bs,Cs,xs,dts,B2,C2
    json.dump(res, open(f"{OUT}/scan.json","w"), indent=1)
elif part == "model":
    T = mode_table()
    for preset, modes in [("kth", ["fast", "fast-ckpt"]), ("mmnist", ["fast", "fast-ckpt"])]:
        shape=SHAPES[preset]; torch.manual_seed(0)
        init={k:v.clone() for k,v in build_model(preset).state_dict().items()}
        for maxl in [1 << 30, 256]:
            ss2dmod.FUSED_TRITON_MAX_L = maxl
            for m in modes:
                if maxl == 256 and m != "fast": continue
                t0=time.time()
                try:
                    r=time_mode(preset, shape, T[m], init, torch.device("cuda"), 2, 5, infer=True)
                except Exception as e:
                    r={"error":repr(e)[:300]}
                r["wall_s"]=round(time.time()-t0,1)
                print(preset, m, "maxL", maxl, r, flush=True)
                res[f"{preset}/{m}/{maxl}"]=r
        json.dump(res, open(f"{OUT}/model.json","w"), indent=1)
    ss2dmod.FUSED_TRITON_MAX_L = 1 << 30
elif part == "prof":
    preset="kth"; shape=SHAPES[preset]; torch.manual_seed(0)
    model=build_model(preset).cuda().train(); frames=_frames(shape, model.config, "cuda")
    opt=torch.optim.Adam(model.parameters(), lr=1e-4)
    ex=ExecutionConfig.reference().replace(precision="bf16", fused=True)
    step=make_train_step(model,opt,n_input=shape.n_input,execution=ex,device="cuda")
    step(frames); step(frames); torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step(frames); torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70), flush=True)
