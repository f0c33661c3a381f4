"""``rosa2 eval``, ``compile``, ``bench compare`` and ``bench compile``: check the flags, name the run folder,
call :mod:`rosa2_dspy.experiments` and print what it wrote."""

from __future__ import annotations

import contextlib
from pathlib import Path

from rosa2_dspy.cli.common import (LEGACY_MODEL_IDENTITY, METHOD_ORDER, CLIError, apply_session_recipe,
                                    check_compiled_adapter, compile_overlap, data_identity, engine_for,
                                    model_identity, program_kwargs, ray_workers, seen_by, session_identity, train_val)


def cmd_eval(args) -> int:
    from rosa2_dspy.evaluation import prepare_run_dir
    from rosa2_dspy.experiments import session_defaults
    from rosa2_dspy.fsutil import write_json_atomic
    from rosa2_dspy.math.data import load_examples
    from rosa2_dspy.program_loader import load_program

    if args.limit is not None and args.limit < 0:
        raise CLIError(f"--limit must be >= 0, got {args.limit}")
    apply_session_recipe(args)
    if args.method:
        session_identity(args)
        if args.clarify:
            raise CLIError("--clarify is for a single pass: a session's words step is its clarification "
                           "(--method pe, pe-then-ttt or rosa2)")
    if args.threads < 1:
        raise CLIError(f"--threads must be >= 1, got {args.threads}")
    examples = load_examples(args.split, data_file=args.data_file, input_field=args.input_field,
                             answer_field=args.answer_field, subjects=args.subject, levels=args.level,
                             ids=args.ids, limit=args.limit, seed=None if args.no_shuffle else args.seed)
    if not examples:
        raise CLIError("no problems match the given split and filters")
    kwargs = {}
    compiled_meta = None
    overlap = None
    if args.compiled:
        from rosa2_dspy.artifacts import read_meta

        compiled_meta = read_meta(args.compiled)
        if args.method:
            check_compiled_adapter(compiled_meta, args)
        overlap = compile_overlap(seen_by(compiled_meta), examples, args.allow_overlap,
                                   f"the compile of {args.compiled}")
        args.program = compiled_meta.get("program", args.program)
        kwargs.update(compiled_meta.get("program_kwargs") or {})
        if args.model == "default":
            args.model = compiled_meta.get("model", args.model)
    kwargs.update(program_kwargs(args))
    program = load_program(args.program, **kwargs)
    config = {
        "command": "eval", "program": args.program, "program_kwargs": kwargs,
        "compiled": str(Path(args.compiled).resolve()) if args.compiled else None, **data_identity(args),
        **model_identity(args), "max_tokens": args.max_tokens, "temperature": args.temperature,
        "compile_overlap": overlap,
    }
    if args.method:
        config.update(session_identity(args), method=args.method)
    resume_keys = tuple(k for k in config if k not in ("limit", "compile_overlap"))
    out = prepare_run_dir(args.out, config, resume_keys=resume_keys,
                          defaults={**session_defaults(legacy=True), **LEGACY_MODEL_IDENTITY})
    if args.method:
        return _run_methods(args, [args.method], examples, program, out, compiled=args.compiled, overlap=overlap,
                            spec=(args.program, kwargs))
    from rosa2_dspy.experiments import evaluate

    workers = ray_workers(args, args.program, kwargs, "evaluation", args.threads, max_tokens=args.max_tokens,
                          temperature=args.temperature, cache=args.cache)
    engine = None if workers else engine_for(args)
    if args.compiled and engine is not None:
        from rosa2_dspy.artifacts import load_compiled

        load_compiled(args.compiled, program, engine)
    with workers or contextlib.nullcontext():  # the actors stop however the run ends (resumed with nothing to do)
        summary = evaluate(program, examples, out, engine=engine, threads=args.threads, max_tokens=args.max_tokens,
                           temperature=args.temperature, cache=args.cache, progress=not args.no_progress,
                           workers=workers)
    summary.update({"batching": args.batching, "program": args.program, "split": args.split})
    if args.compiled:
        from rosa2_dspy.artifacts import instructions_of
        from rosa2_dspy.weights import adapter_shift

        summary.update({"compiled": args.compiled, "compile_overlap": overlap})
        if engine is not None:  # on Ray the actors loaded it
            summary.update({"instructions": instructions_of(program),
                            "adapter_l2_shift": round(adapter_shift(engine).total, 6)})
    write_json_atomic(out / "summary.json", summary)
    _print_summary(summary, out)
    if workers is not None:
        _print_ray(workers)
    return 0


def _print_ray(workers) -> None:
    ray = workers.engine_facts()["ray"]
    print(f"ray: {ray['actors']} actors, {ray.get('lost_actors', 0)} lost, {ray.get('rerun_items', 0)} items rerun "
          f"elsewhere, {ray.get('started_replacements', 0)} replacements started")


def _run_methods(args, methods: list[str], examples: list, program, out: Path, *, spec: tuple[str, dict],
                 compiled: str | None = None, overlap: int | None = None) -> int:
    """Run each method's sessions on the same problems (experiments.compare_methods); print the report.
    ``spec``: the program's file and keyword arguments, which Ray actors load it from."""
    from rosa2_dspy.experiments import compare_methods, session_configs

    session, update = session_configs(vars(args), max_tokens=args.max_tokens, seed=args.seed)
    workers = ray_workers(args, *spec, "comparison", args.threads, methods=methods, user=args.user,
                          session=session, update=update)
    engine = None if workers else engine_for(args)
    if compiled and engine is not None:
        from rosa2_dspy.artifacts import load_compiled

        load_compiled(compiled, program, engine)
    notes = [] if overlap is None else [f"Started from the compiled artifact {compiled}; {overlap} of these problems "
                                        "were among its training or validation problems."]
    with workers or contextlib.nullcontext():
        report = compare_methods(program, examples, methods, out, engine=engine, user=args.user, session=session,
                                 update=update, threads=args.threads, notes=notes, progress=not args.no_progress,
                                 workers=workers)
    print(report.read_text())
    if workers is not None:
        _print_ray(workers)
    return 0


def cmd_compile(args) -> int:
    from rosa2_dspy.recipes import load_recipe

    trainset, valset = train_val(args)
    load_recipe(args.optimizer)  # a bad recipe fails before the model loads
    meta, after = _compile(args, args.optimizer, trainset, valset, args.out)
    _print_compile(meta, after, Path(args.out))
    return 0


def _compile(args, recipe: str, trainset: list, valset: list, out) -> tuple[dict, dict]:
    from rosa2_dspy.experiments import compile_program

    return compile_program(args.program, recipe, trainset, valset, out, engine=engine_for(args),
                           program_kwargs=program_kwargs(args), max_tokens=args.max_tokens, threads=args.threads,
                           meta={"model": args.model, "split": args.split, "seed": args.seed})


def bench_compile(args) -> int:
    """Each recipe compiled from the base weights on the same training problems, then evaluated on the
    same held-out problems; plus the uncompiled baseline (experiments.compare_compiled). Resumable."""
    from rosa2_dspy.artifacts import read_meta
    from rosa2_dspy.evaluation import prepare_run_dir
    from rosa2_dspy.experiments import compare_compiled, compile_method_done
    from rosa2_dspy.math.data import load_examples
    from rosa2_dspy.provenance import segment
    from rosa2_dspy.recipes import load_recipe
    from rosa2_dspy.report import build_compile_report

    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    names = [Path(r).stem for r in recipes]
    clash = next((n for n in names if names.count(n) > 1 or n == "baseline"), None)
    if clash:
        sharing = ", ".join(r for r, n in zip(recipes, names) if n == clash)
        raise CLIError(f"two methods would share the folder {clash!r} ({sharing}, or the baseline): "
                       "rename a recipe file")
    methods = {"baseline": None, **dict(zip(names, recipes))}
    for name, recipe in methods.items():  # an artifact is reused only for the recipe it was compiled from
        text, artifact = load_recipe(recipe).text if recipe else None, Path(args.out) / name / "artifact"
        if recipe and (artifact / "compile.json").is_file() and read_meta(artifact).get("recipe_text") != text:
            raise CLIError(f"{recipe} changed since {artifact} was compiled from it: use another --out "
                           f"(or delete {artifact.parent} to compile and evaluate it again)")
        if recipe and not (artifact / "compile.json").is_file() and (artifact.parent / "results.jsonl").is_file():
            raise CLIError(f"{artifact.parent} holds evaluation results but no compiled artifact: they came from "
                           f"another compile; delete {artifact.parent} to compile and evaluate it again")
    trainset, valset = train_val(args)
    tests = load_examples(args.eval_split, levels=args.eval_level, limit=args.eval_limit, seed=args.seed)
    overlap = compile_overlap([e.unique_id for e in trainset + valset], tests, args.allow_overlap,
                               "every compile here")
    config = {"command": "bench compile", "compile_overlap": overlap, "split": args.split, "level": args.level,
              "limit": args.limit,
              "val_limit": args.val_limit, "eval_split": args.eval_split, "eval_level": args.eval_level,
              "seed": args.seed, **model_identity(args), "program": args.program, "max_tokens": args.max_tokens}
    out = prepare_run_dir(args.out, config, defaults=LEGACY_MODEL_IDENTITY,
                          resume_keys=tuple(k for k in config if k not in ("eval_limit", "compile_overlap")))
    engine = engine_for(args)
    with segment(out, engine) as line:  # the run's command, commit, machine and peak memory, per segment
        summaries = compare_compiled(methods, args.program, trainset, valset, tests, out, engine=engine,
                                     program_kwargs=program_kwargs(args), max_tokens=args.max_tokens,
                                     threads=args.threads, meta={"model": args.model, "split": args.split,
                                                                 "seed": args.seed}, progress=not args.no_progress)
        line["items_left"] = sum(not compile_method_done(summaries.get(name), len(tests)) for name in methods)
    report = build_compile_report(out, summaries, overlap=overlap, ids=[e.unique_id for e in tests])
    print(report.read_text())
    return 0


def bench_compare(args) -> int:
    from rosa2_dspy.evaluation import prepare_run_dir
    from rosa2_dspy.experiments import parse_method, session_defaults
    from rosa2_dspy.math.data import load_examples
    from rosa2_dspy.program_loader import load_program

    default = [m for m in METHOD_ORDER if m != "whole" or args.user == "sharded"]
    methods = list(dict.fromkeys(m.strip() for m in args.methods.split(",") if m.strip())) if args.methods else default
    for method in methods:
        parse_method(method, vars(args))
    if args.limit is None or args.limit < 1:
        raise CLIError("--limit must be given and >= 1 (each method runs every problem)")
    examples = load_examples(args.split, data_file=args.data_file, input_field=args.input_field,
                             answer_field=args.answer_field, subjects=args.subject, levels=args.level,
                             ids=args.ids, limit=args.limit, seed=None if args.no_shuffle else args.seed)
    if not examples:
        raise CLIError("no problems match the given split and filters")
    program_spec, kwargs, overlap = args.program, {}, None
    if args.compiled:
        from rosa2_dspy.artifacts import read_meta

        meta = read_meta(args.compiled)
        check_compiled_adapter(meta, args)
        overlap = compile_overlap(seen_by(meta), examples, args.allow_overlap, f"the compile of {args.compiled}")
        program_spec, kwargs = meta.get("program", program_spec), meta.get("program_kwargs") or {}
    config = {"command": "bench compare", **data_identity(args), **model_identity(args), "program": program_spec,
              "program_kwargs": kwargs, "max_tokens": args.max_tokens, "compile_overlap": overlap,
              "compiled": str(Path(args.compiled).resolve()) if args.compiled else None, **session_identity(args)}
    # a larger --limit extends a run (the report reads only the problems asked for); nothing else may change
    out = prepare_run_dir(args.out, config, resume_keys=tuple(k for k in config if k not in ("limit", "compile_overlap")),
                          defaults={**session_defaults(legacy=True), **LEGACY_MODEL_IDENTITY})
    return _run_methods(args, methods, examples, load_program(program_spec, **kwargs), out, compiled=args.compiled,
                        overlap=overlap, spec=(program_spec, kwargs))


def _print_compile(meta: dict, after: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"rosa2 compile - {meta['recipe']['kind']} on {len(meta['train_ids'])} {meta['split']} "
                        f"problems ({meta['seconds']} s)")
    table.add_column("predictor")
    table.add_column("instruction before")
    table.add_column("instruction after")
    for name, text in meta["instructions_before"].items():
        table.add_row(name, text, after.get(name, "") if after.get(name) != text else "(unchanged)")
    console.print(table)
    console.print(f"adapter L2 shift: {meta['adapter_l2_shift']}")
    console.print(f"artifact: {out}   evaluate it: rosa2 eval --compiled {out} --split test --limit 20 --out runs/NAME")


def _print_summary(summary: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"rosa2 eval - {summary['program']} on {summary['split']} ({summary['model']})")
    for col in ("problems", "accuracy (95% CI)", "strict", "boxed", "parse fail", "hit cap", "tok/s", "s/problem"):
        table.add_column(col, justify="right")
    low, high = summary["accuracy_ci95"]
    cap = summary.get("hit_token_cap_rate")
    table.add_row(
        str(summary["problems"]), f"{summary['accuracy']:.1%} ({low:.0%}-{high:.0%})",
        f"{summary['strict_accuracy']:.1%}", f"{summary['boxed_rate']:.1%}", f"{summary['parse_failure_rate']:.1%}",
        "-" if cap is None else f"{cap:.0%}",
        f"{summary.get('tokens_per_second') or '-'}", f"{summary.get('seconds_per_problem') or '-'}",
    )
    console = Console()
    console.print(table)
    console.print(f"results: {out / 'results.jsonl'}   summary: {out / 'summary.json'}")
