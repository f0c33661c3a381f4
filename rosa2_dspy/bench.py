"""Benchmarks that print JSON (targets are checked here, never by timed tests).

``rosa2 bench update``: see :mod:`rosa2_dspy.bench_update`.

``rosa2 bench engine``: tokens/s on the same prompts for (a) raw transformers ``generate``,
batch 1; (b) the engine, one request at a time; (c) the engine under 8 concurrent DSPy calls;
(d) raw ``generate``, batch 8; plus the memory-bandwidth bound for batch 1 and peak RSS; and per batch
size (``--batch-sizes``, default 1,8,16,32) decode and prefill tokens/s against the roofline measured on
this machine in the model's dtype (``roofline_fraction``).
"""

from __future__ import annotations

import contextlib
import threading
import time

import torch

from rosa2_dspy.models import cpu_description
from rosa2_dspy.memory import peak_rss_mib

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


def bench_engine(spec: str = "default", *, max_tokens: int = 96, concurrency: int = 8,
                 cache_variants: bool = False, batch_sizes: list[int] | None = (1, 8, 16, 32),
                 mixed_weights: int = 0, repeats: int = 3, prepack: bool | None = None) -> dict:
    """``prepack``: the weights the engine serves from (None: the shared engine's as they are, its default when
    this call loads it; the CLI passes the resolved setting); the roofline times the other setting beside it."""
    from rosa2_dspy.engine import LocalEngine, usage_scope

    # (b) and (c) measure padded batches against raw generate
    engine = LocalEngine.shared(spec, continuous=False, prepack=prepack)
    prompts_text = BENCH_PROMPTS[:concurrency]
    prompts = [engine.encode_chat([{"role": "user", "content": p}]) for p in prompts_text]
    _raw_generate(engine, prompts[:1], 8)  # warm-up

    results: dict = {"model": engine.name, "device": str(engine.device), "cpu": cpu_description(),
                     "dtype": engine.info.get("dtype"), "prepacked": engine.prepacked,
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
    if cache_variants:
        with prepacked(engine, False):  # torch.compile traces plain linears; these variants predate prepacking
            results["cache_variants"] = bench_cache_variants(engine, prompts, max_tokens)
    if batch_sizes:
        results["roofline"] = bench_roofline(engine, prompts, batch_sizes, max_tokens, repeats=repeats)
        results["peak_rss_mib"] = round(peak_rss_mib(), 1)
    if mixed_weights:
        results["mixed_weights"] = bench_mixed_weights(engine, prompts, mixed_weights, max_tokens)
    return results


def _variant_kwargs(variant: str) -> dict:
    """generate() keyword arguments for a KV-cache / compilation variant of the raw loop."""
    if variant == "dynamic":
        return {}
    if variant == "static":
        return {"cache_implementation": "static", "disable_compile": True}
    if variant == "static+compile":
        from transformers import CompileConfig

        config = CompileConfig(mode="default", dynamic=False)
        config._compile_all_devices = True  # transformers only auto-compiles on accelerators otherwise
        return {"cache_implementation": "static", "compile_config": config}
    raise ValueError(f"unknown cache variant {variant!r}")


CACHE_VARIANTS = ("dynamic", "static", "static+compile")


def _generate_exactly(engine, batch: list[list[int]], max_tokens: int, **extra) -> tuple[torch.Tensor, float]:
    """Raw greedy generate of exactly ``max_tokens`` new tokens per row; returns (new tokens, seconds)."""
    from rosa2_dspy.engine import left_pad

    tok = engine.tokenizer
    ids, mask = left_pad(batch, tok.pad_token_id)
    started = time.perf_counter()
    with torch.inference_mode():
        out = engine.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens,
                                    min_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                                    temperature=None, top_p=None, top_k=None, **extra)
    return out[:, ids.shape[1]:], time.perf_counter() - started


def matmul_gflops(dtype, size: int = 2048, repeats: int = 3) -> float:
    """Measured matmul throughput in ``dtype`` (square ``size`` matrices, best of a few runs)."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    a @ b  # warm-up (first-call set-up, thread pool)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * size ** 3 / best / 1e9


def decode_cost(model) -> tuple[int, int]:
    """(bytes of weights read, FLOPs) per generated token of a decode step, short context.

    Every linear layer's weights are read once per step whatever the batch, and each row costs 2
    FLOPs per weight; the input embedding only gathers a row per token (unless tied to the output
    head, which reads it whole). Attention over the KV cache is left out: small at the context
    lengths here, so the roofline is a slight overestimate of what is reachable."""
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings().weight if model.get_output_embeddings() is not None else None
    tied = output is not None and output.data_ptr() == embedding.data_ptr()
    read, flops = 0, 0
    for name, param in model.named_parameters():
        if param.data_ptr() == embedding.data_ptr() and not tied:
            continue
        read += param.numel() * param.element_size()
        if param.dim() == 2:
            flops += 2 * param.numel()
    return read, flops


def prefill_and_step(engine, batch: list[list[int]], steps: int) -> tuple[float, float, torch.Tensor]:
    """Seconds of the batch's prefill (one new token) and of one decode step, the latter measured over
    ``steps`` greedy steps after the prefill, so prompt processing does not count against decoding; and the
    tokens generated."""
    _, prefill = _generate_exactly(engine, batch, 1)
    new, whole = _generate_exactly(engine, batch, steps + 1)
    return prefill, max(whole - prefill, 1e-9) / steps, new


@contextlib.contextmanager
def prepacked(engine, on: bool):
    """The engine with its base weights prepacked (or not) for a while, then as it was."""
    was = engine.prepacked
    engine.set_prepack(on)
    try:
        yield
    finally:
        engine.set_prepack(was)


def bench_roofline(engine, prompts: list[list[int]], sizes: list[int], max_tokens: int, repeats: int = 3) -> dict:
    """Decode and prefill tokens/s of raw greedy ``generate`` per batch size, against the roofline.

    The roofline of a decode step at batch B is the larger of reading the weights once at the measured
    copy bandwidth and B tokens' FLOPs at the measured matmul throughput in the model's dtype; its
    tokens/s is B over that time. Decode time is the time for ``max_tokens`` new tokens minus the time
    for one (the prefill), so prompt processing does not count against decoding.

    Each batch size is measured ``repeats`` times (prepacked and not, alternating) and the fastest run is
    reported, as ``timeit`` does: on a shared host contention only ever slows a run down, and one run's step time
    moved 1.5x within minutes on the same box (BENCHMARKS.md, session 21). ``step_ms_runs`` keeps every run.

    ``served_*``: the same rows' decode step in the engine's own decoder (:class:`ContinuousDecoder`, what a
    continuously batched run serves with: its KV cache appends in place), measured in the same rounds."""
    dtype = next(engine.model.parameters()).dtype
    bandwidth, gflops = copy_bandwidth_gbs(), matmul_gflops(dtype)
    read, flops = decode_cost(engine.model)
    out = {"dtype": str(dtype).replace("torch.", ""), "copy_bandwidth_gb_s": round(bandwidth, 1),
           "matmul_gflop_s": round(gflops, 1), "weight_bytes_per_step": read, "flop_per_token": flops,
           "new_tokens": max_tokens, "batches": {}}
    from rosa2_dspy.engine.prepack import model_refusal

    # the engine's prepacking (engine.prepack) against the other setting, where this build can pack: each batch
    # size runs both, in alternating order, so drift in machine load hits both alike
    served = engine.prepacked
    other = (not served) if model_refusal(engine.model) is None else None
    out["prepacked"] = served
    for index, size in enumerate(sizes):
        batch = [prompts[i % len(prompts)] for i in range(size)]
        runs, every, served_steps = {}, [], []
        for repeat in range(repeats):
            # the engine's decoder (the served_* figures) and raw generate prepacked and not, in an order that turns
            # round each round, so neither path always runs first (on a warm or a cooling host)
            order = ["decoder", served, other] if (index + repeat) % 2 == 0 else [other, served, "decoder"]
            for on in order:
                if on == "decoder":
                    with prepacked(engine, served):
                        served_steps.append(continuous_step_seconds(engine, batch, [None] * size, max_tokens - 1))
                elif on is not None:
                    with prepacked(engine, on):
                        result = prefill_and_step(engine, batch, max_tokens - 1)
                    if on == served:
                        every.append(result[1])
                    best = runs.get(on)  # the fastest prefill and the fastest step; the first run's tokens
                    runs[on] = result if best is None else (min(best[0], result[0]), min(best[1], result[1]),
                                                            best[2])
        prefill, step, tokens = runs[served]
        memory_s, compute_s = read / (bandwidth * 1e9), size * flops / (gflops * 1e9)
        roofline = size / max(memory_s, compute_s)
        measured = size / step
        row = out["batches"][str(size)] = {
            "decode_tokens_per_s": round(measured, 1), "roofline_tokens_per_s": round(roofline, 1),
            "roofline_fraction": round(measured / roofline, 3),
            "bound": "memory" if memory_s >= compute_s else "compute",
            "step_ms": round(1000 * step, 1), "step_ms_runs": [round(1000 * s, 1) for s in every],
            "roofline_step_ms": round(1000 * max(memory_s, compute_s), 1),
            "prefill_tokens_per_s": round(sum(len(p) for p in batch) / prefill, 1),
            "served_step_ms": round(1000 * min(served_steps), 1),
            "served_step_ms_runs": [round(1000 * s, 1) for s in served_steps],
            "served_roofline_fraction": round(size / min(served_steps) / roofline, 3)}
        if other is not None:
            other_prefill, other_step, other_tokens = runs[other]
            key = "unpacked" if served else "prepacked"
            row.update({f"{key}_step_ms": round(1000 * other_step, 1),
                        f"{key}_prefill_tokens_per_s": round(sum(len(p) for p in batch) / other_prefill, 1),
                        "prepack_speedup_decode": round((other_step / step) if served else (step / other_step), 3),
                        "greedy_identical_prepacked_vs_unpacked": bool(torch.equal(tokens, other_tokens))})
    return out


def bench_mixed_weights(engine, prompts: list[list[int]], adapters: int, max_tokens: int, rounds: int = 2) -> dict:
    """A batch whose rows carry different LoRA weights (2 rows per adapter, ``adapters`` random adapters):
    raw greedy generate on one adapter (every row the same weights), through PEFT's ``adapter_names``,
    and through the engine's per-row path, interleaved round by round; exactly ``max_tokens`` per row. Then
    the continuous decoder's step on one adapter and with each row's own (``max_tokens`` steps each)."""
    import copy

    engine.attach_adapter()
    peft_model = engine.peft_model
    start = engine.snapshot()
    generator = torch.Generator().manual_seed(0)
    pins = []
    for _ in range(adapters):
        with torch.no_grad():
            for name, tensor in engine.adapter_state().items():
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * (0.01 if "lora_B" in name else 0.05))
        engine.mark_changed()
        pins.append(engine.pin())
    names = [f"bench_mixed{i}" for i in range(adapters)]
    for name, ident in zip(names, pins):  # PEFT's way: one named adapter per weights
        peft_model.add_adapter(name, copy.deepcopy(peft_model.peft_config["default"]))
        params = dict(peft_model.named_parameters())
        with torch.no_grad():
            for key, tensor in engine.pinned_state(ident).items():
                params[key.replace(".default.", f".{name}.")].copy_(tensor)
    peft_model.set_adapter("default")
    peft_model.eval()
    rows = [prompts[i % len(prompts)] for i in range(2 * adapters)]
    row_pins = [pins[i % adapters] for i in range(len(rows))]
    seconds = {"one_adapter": 0.0, "peft_adapter_names": 0.0, "engine_per_row": 0.0}
    try:
        for _ in range(rounds):
            engine.use_pinned(pins[0])
            _, took = _generate_exactly(engine, rows, max_tokens)
            seconds["one_adapter"] += took
            peft_out, took = _generate_exactly(engine, rows, max_tokens,
                                               adapter_names=[names[i % adapters] for i in range(len(rows))])
            seconds["peft_adapter_names"] += took
            with engine._per_row_adapters(engine._weights_for(row_pins)):
                ours, took = _generate_exactly(engine, rows, max_tokens)
            seconds["engine_per_row"] += took
        steps = {"one_adapter": continuous_step_seconds(engine, rows, [pins[0]] * len(rows), max_tokens),
                 "per_row": continuous_step_seconds(engine, rows, row_pins, max_tokens)}
    finally:
        for name in names:
            peft_model.delete_adapter(name)
        peft_model.set_adapter("default")
        for ident in pins:
            engine.unpin(ident)
        engine.restore(start)
    tokens = rounds * len(rows) * max_tokens
    out = {"adapters": adapters, "rows": len(rows), "rounds": rounds,
           "continuous_decode_step_ms": {k: round(1000 * v, 1) for k, v in steps.items()},
           "continuous_per_row_over_one_adapter": round(steps["per_row"] / steps["one_adapter"], 3)}
    out.update({f"{k}_tokens_per_s": round(tokens / v, 1) for k, v in seconds.items()})
    out["engine_per_row_vs_one_adapter"] = round(seconds["one_adapter"] / seconds["engine_per_row"], 3)
    out["engine_per_row_vs_peft"] = round(seconds["peft_adapter_names"] / seconds["engine_per_row"], 3)
    out["same_tokens_as_peft"] = bool(torch.equal(peft_out, ours))
    return out


def continuous_step_seconds(engine, rows: list[list[int]], idents: list[str], steps: int) -> float:
    """Seconds per decode step of a continuous batch (:class:`ContinuousDecoder`) whose rows ask for ``idents``
    (one id for all: the adapter slot; several: each row its own), after the rows have joined."""
    from rosa2_dspy.engine import ContinuousDecoder, GenSettings, Row

    class Tag:  # what the engine's forward context reads from a row
        def __init__(self, ident):
            self.settings = GenSettings(max_tokens=steps + 2, do_sample=False, temperature=0.0, top_p=None,
                                        top_k=None, seed=None, weights=ident)

    decoder = ContinuousDecoder(engine.model, engine.tokenizer, [], engine.tokenizer.pad_token_id,
                                max_rows=len(rows), forward_context=engine._rows_context)
    with torch.inference_mode(), engine.weights_lock:
        decoder.step([Row(ids, steps + 2, tag=Tag(ident)) for ids, ident in zip(rows, idents)])  # joins, prefill
        decoder.step([])  # the first step after a join builds what later steps reuse
        started = time.perf_counter()
        for _ in range(steps):
            decoder.step([])
    return (time.perf_counter() - started) / steps


def bench_cache_variants(engine, prompts: list[list[int]], max_tokens: int, rounds: int = 2) -> dict:
    """Raw greedy generate at batch 1 and batch len(prompts) under each KV-cache variant, interleaved
    round by round; the first call of each variant (compilation, cache allocation) is timed apart."""
    out: dict = {}

    def run(batch: list[list[int]], variant: str) -> tuple[int, float, list]:
        new, seconds = _generate_exactly(engine, batch, max_tokens, **_variant_kwargs(variant))
        return new.numel(), seconds, new.tolist()

    groups = {"batch1": [prompts[:1]], f"batch{len(prompts)}": [prompts]}
    for variant in CACHE_VARIANTS:
        for group, batches in groups.items():
            try:
                _, seconds, _ = run(batches[0], variant)
                out.setdefault(variant, {})[f"{group}_first_call_seconds"] = round(seconds, 2)
            except Exception as exc:  # noqa: BLE001 - a variant that cannot run here is reported, not fatal
                out[variant] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
                break
    totals = {v: {g: [0, 0.0] for g in groups} for v in CACHE_VARIANTS if "error" not in out.get(v, {})}
    reference: dict = {}
    same = {v: True for v in totals}
    for _ in range(rounds):
        for group, batches in groups.items():
            for variant in totals:
                tokens, seconds, texts = run(batches[0], variant)
                totals[variant][group][0] += tokens
                totals[variant][group][1] += seconds
                reference.setdefault(group, texts)
                same[variant] &= texts == reference[group]
    for variant in totals:  # a prompt of another length: a new cache shape (recompiles where compiled)
        _, seconds, _ = run(prompts[1:2], variant)
        out[variant]["batch1_new_prompt_length_first_call_seconds"] = round(seconds, 2)
    for variant, by_group in totals.items():
        for group, (tokens, seconds) in by_group.items():
            out[variant][f"{group}_tokens_per_s"] = round(tokens / seconds, 2)
        out[variant]["greedy_identical_to_dynamic"] = same[variant]
    for variant in totals:
        if variant != "dynamic":
            for group in groups:
                out[variant][f"{group}_speedup_vs_dynamic"] = round(
                    out[variant][f"{group}_tokens_per_s"] / out["dynamic"][f"{group}_tokens_per_s"], 3)
    return out


# ----------------------------------------------------------------------------- rosa2 bench update

