"""A stack of the 1.5B model's linear shapes (L layers x 7 projections, random weights): plain F.linear against
oneDNN-prepacked weights (torch.ops.mkldnn._linear_pointwise) at 1-32 rows, interleaved, median of 6.
Usage: python prepack_layers.py THREADS LAYERS [float32|bfloat16]. Session 14 (2026-12-05), AMD EPYC with avx512_bf16."""
import time, torch, sys
torch.set_num_threads(int(sys.argv[1]))
torch.manual_seed(0); DT = getattr(torch, sys.argv[3]) if len(sys.argv) > 3 else torch.bfloat16
H, I, KV, L = 1536, 8960, 256, int(sys.argv[2]) if len(sys.argv) > 2 else 6
shapes = [(H, H), (KV, H), (KV, H), (H, H), (I, H), (I, H), (H, I)]
ws = [torch.randn(o, i, dtype=DT) * 0.02 for _ in range(L) for (o, i) in shapes]
packs = [torch.ops.mkldnn._reorder_linear_weight(w, None) for w in ws]
def plain(x):
    for w in ws:
        y = torch.nn.functional.linear(x if w.shape[1] == x.shape[-1] else x.new_zeros(*x.shape[:-1], w.shape[1]), w)
    return y
def run(x, packed):
    h = x
    outs = []
    for k, w in enumerate(ws):
        inp = h if w.shape[1] == H else hI
        y = torch.ops.mkldnn._linear_pointwise(inp, packs[k], None, "none", [], "") if packed else torch.nn.functional.linear(inp, w)
        if w.shape[0] == I: hI = y
        elif w.shape[0] == H: h = y
    return h
with torch.inference_mode():
    for M in (1, 4, 16, 32):
        x = torch.randn(M, 1, H, dtype=DT)
        hI = None
        # warm
        globals()['hI'] = torch.randn(M, 1, I, dtype=DT)
        for p in (0, 1): run(x, p)
        t = {0: [], 1: []}
        for r in range(6):
            for p in ((0, 1) if r % 2 else (1, 0)):
                s = time.perf_counter(); run(x, p); t[p].append(time.perf_counter() - s)
        mb = sum(w.numel() for w in ws) * 2 / 1e6
        a, b = sorted(t[0])[len(t[0])//2] * 1e3, sorted(t[1])[len(t[1])//2] * 1e3
        print(f"M={M:2d} plain {a:7.1f} ms ({mb/a:5.1f} GB/s) packed {b:7.1f} ms ({mb/b:5.1f} GB/s) ratio {a/b:.2f}", flush=True)
