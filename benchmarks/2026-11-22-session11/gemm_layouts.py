"""GFLOP/s of bf16 GEMMs of the 1.5B model's shapes at 16 and 1000 rows: F.linear on the stored (out, in) weight, on a transposed-contiguous copy, the backward's grad @ W, and oneDNN prepacked weights. Usage: python gemm_layouts.py

Session 11 (2026-11-22); run from the repository root with .venv/bin/python, nothing else running."""
import torch, time
torch.manual_seed(0)
def t(fn, n=10):
    for _ in range(2): fn()
    best=1e9
    for _ in range(3):
        s=time.perf_counter()
        for _ in range(n): fn()
        best=min(best,(time.perf_counter()-s)/n)
    return best
dt=torch.bfloat16
for (K,N) in ((1536,8960),(8960,1536),(1536,1536)):
    W=torch.randn(N,K,dtype=dt); Wt=W.t().contiguous()
    packed = torch.ops.mkldnn._reorder_linear_weight(W, None) if hasattr(torch.ops.mkldnn, "_reorder_linear_weight") else None
    for M in (16, 1000):
        x=torch.randn(M,K,dtype=dt); g=torch.randn(M,N,dtype=dt)
        f=2*M*K*N/1e9
        a=t(lambda: torch.nn.functional.linear(x,W)); b=t(lambda: torch.nn.functional.linear(x,Wt.t()))
        c=t(lambda: g@W)  # backward grad_input with plain layout
        d=t(lambda: g@Wt.t())
        line=f"M={M} K={K} N={N}: linear(plain) {f/a:.0f}  linear(Wt view) {f/b:.0f}  bwd g@W {f/c:.0f}  bwd g@Wt.t() {f/d:.0f}"
        if packed is not None:
            e=t(lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""))
            line+=f"  packed {f/e:.0f}"
        print(line, "GF/s", flush=True)
