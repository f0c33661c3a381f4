"""Per shape and dtype: is F.linear batch-invariant (row 0 the same at 1..32 rows), is the prepacked product, and
does the prepacked product equal the plain one bit for bit. Usage: python prepack_invariance.py THREADS.
Session 14 (2026-12-05), AMD EPYC with avx512_bf16."""
import torch, sys
torch.set_num_threads(int(sys.argv[1]))
torch.manual_seed(0)
for DT in (torch.float32, torch.bfloat16):
    for (o, i) in ((8960, 1536), (1536, 8960), (256, 1536), (64, 64), (128, 64)):
        w = torch.randn(o, i, dtype=DT) * 0.02
        p = torch.ops.mkldnn._reorder_linear_weight(w, None)
        x = torch.randn(32, 1, i, dtype=DT)
        with torch.inference_mode():
            res = {}
            for name, f in (("plain", lambda x: torch.nn.functional.linear(x, w)),
                            ("packed", lambda x: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], ""))):
                full = f(x)
                inv = all(torch.equal(f(x[:m])[0], full[0]) for m in (1, 2, 4, 8, 16))
                res[name] = (inv, full)
            print(DT, (o, i), "batch-invariant plain", res["plain"][0], "packed", res["packed"][0],
                  "packed==plain", torch.equal(res["plain"][1], res["packed"][1]),
                  "maxdiff", (res["plain"][1].float() - res["packed"][1].float()).abs().max().item())
