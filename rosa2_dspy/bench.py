"""Benchmarks that print JSON (targets are checked here, never by timed tests).

``rosa2 bench engine``: tokens/s on the same prompts for (a) raw transformers ``generate``,
batch 1; (b) the engine, one request at a time; (c) the engine under 8 concurrent DSPy calls;
(d) raw ``generate``, batch 8; plus the memory-bandwidth bound for batch 1 and peak RSS.
"""

from __future__ import annotations

import resource
import threading
import time

import torch

BENCH_PROMPTS = [
    "What is the sum of the first 20 positive integers? Explain step by step.",
    "Solve for x: 3x + 7 = 22. Show your work.",
    "A rectangle has a perimeter of 30 and a length of 9. What is its area?",
    "Compute 15% of 240 and explain how.",
    "How many prime numbers are there between 10 and 40? List them.",
    "Simplify the fraction 84/126 and explain each step.",
    "If a train travels 180 km in 2.5 hours, what is its average speed?",
    "What is the least common multiple of 12, 18 and 30?",
]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def copy_bandwidth_gbs(megabytes: int = 512, repeats: int = 5) -> float:
    """Measured memory copy bandwidth (read + write bytes per second), best of a few runs."""
    src = torch.empty(megabytes * (1 << 20) // 4, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - started)
    return 2 * src.numel() * 4 / best / 1e9


def _raw_generate(engine, prompts: list[list[int]], max_tokens: int) -> int:
    """Plain transformers generate on a left-padded batch; returns the generated (non-pad) tokens."""
    from rosa2_dspy.engine import left_pad

    tok = engine.tokenizer
    ids, mask = left_pad(prompts, tok.pad_token_id)
    width = ids.shape[1]
    with torch.inference_mode():
        out = engine.model.generate(input_ids=ids.to(engine.device), attention_mask=mask.to(engine.device),
                                    max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                                    eos_token_id=engine.eos_token_ids, temperature=None, top_p=None, top_k=None)
    total = 0
    for row in out[:, width:].tolist():
        for t in row:
            if t in engine.eos_token_ids:
                break
            total += 1
    return total


def bench_engine(spec: str = "default", *, max_tokens: int = 96, concurrency: int = 8) -> dict:
    from rosa2_dspy.engine import LocalEngine, usage_scope

    engine = LocalEngine.shared(spec)
    prompts_text = BENCH_PROMPTS[:concurrency]
    prompts = [engine.encode_chat([{"role": "user", "content": p}]) for p in prompts_text]
    _raw_generate(engine, prompts[:1], 8)  # warm-up

    results: dict = {"model": engine.name, "device": str(engine.device), "dtype": engine.info.get("dtype"),
                     "torch_threads": torch.get_num_threads(), "max_tokens": max_tokens, "prompts": len(prompts)}

    def timed(fn):
        started = time.perf_counter()
        tokens = fn()
        seconds = time.perf_counter() - started
        return {"tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 2)}

    lm = engine.lm(cache=False, max_tokens=max_tokens)
    lm(messages=[{"role": "user", "content": "warm-up"}], max_tokens=2)  # DSPy's one-time first-call set-up

    # (a) and (b) alternate prompt by prompt, so drift in machine load hits both alike
    texts_sequential = []
    raw = {"tokens": 0, "seconds": 0.0}
    eng = {"tokens": 0, "seconds": 0.0}
    for ids, text in zip(prompts, prompts_text):
        started = time.perf_counter()
        raw["tokens"] += _raw_generate(engine, [ids], max_tokens)
        raw["seconds"] += time.perf_counter() - started
        started = time.perf_counter()
        with usage_scope() as usage:
            texts_sequential.append(lm(messages=[{"role": "user", "content": text}])[0])
        eng["seconds"] += time.perf_counter() - started
        eng["tokens"] += usage["output_tokens"]
    for key, part in (("a_raw_batch1", raw), ("b_engine_sequential", eng)):
        results[key] = {"tokens": part["tokens"], "seconds": round(part["seconds"], 2),
                        "tokens_per_s": round(part["tokens"] / part["seconds"], 2)}

    texts_concurrent: dict[int, str] = {}
    tokens_concurrent: dict[int, int] = {}

    def concurrent():
        barrier = threading.Barrier(len(prompts_text))

        def call(i, text):
            barrier.wait()
            with usage_scope() as usage:
                texts_concurrent[i] = lm(messages=[{"role": "user", "content": text}])[0]
            tokens_concurrent[i] = usage["output_tokens"]

        threads = [threading.Thread(target=call, args=(i, t)) for i, t in enumerate(prompts_text)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sum(tokens_concurrent.values())

    batches_before = engine.stats["batches"]
    results["c_engine_concurrent_dspy"] = timed(concurrent)
    results["c_engine_concurrent_dspy"]["batches"] = engine.stats["batches"] - batches_before
    results["d_raw_batch8"] = timed(lambda: _raw_generate(engine, prompts, max_tokens))
    results["greedy_identical_batched_vs_sequential"] = all(
        texts_concurrent[i] == texts_sequential[i] for i in range(len(prompts_text)))

    weight_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    bandwidth = copy_bandwidth_gbs()
    bound = bandwidth * 1e9 / weight_bytes
    a = results["a_raw_batch1"]["tokens_per_s"]
    b = results["b_engine_sequential"]["tokens_per_s"]
    c = results["c_engine_concurrent_dspy"]["tokens_per_s"]
    results.update({
        "weight_bytes": weight_bytes,
        "copy_bandwidth_gb_s": round(bandwidth, 2),
        "bandwidth_bound_batch1_tokens_per_s": round(bound, 1),
        "ratio_b_over_a": round(b / a, 3),
        "ratio_c_over_a": round(c / a, 3),
        "a_fraction_of_bound": round(a / bound, 3),
        "c_fraction_of_bound_batch1": round(c / bound, 3),
        "targets": {"b_ge_0.95a": b >= 0.95 * a, "c_ge_2.5a": c >= 2.5 * a},
        "peak_rss_mib": round(peak_rss_mib(), 1),
    })
    return results
