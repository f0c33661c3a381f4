"""Experiments as a library: evaluate a program, compare multi-turn methods, compile with a recipe, compare
compile-time methods. The ``rosa2`` command parses flags, checks them, names the run folder and calls these.

Each function takes the problems, an engine and a run folder, appends one JSON line per finished item (so a
rerun resumes) and writes its summary and report there::

    engine = LocalEngine.shared("default")
    examples = load_examples("test", levels="1,2,3", limit=100)
    compare_methods(load_program("programs/math_solver.py"), examples, ["single", "rosa2"], "runs/cmp",
                    engine=engine, user="sharded", session=SessionConfig(turns=3))

The settings a session takes from a command line or a ``[session]`` recipe table are declared once, in
:data:`SESSION_SETTINGS`: each names its field of :class:`~rosa2_dspy.coadapt.SessionConfig` or
:class:`~rosa2_dspy.weights.UpdateConfig` (the weights step's defaults: ``session_update_config``), which
gives its type and default; the flags, the recipe keys and a run's identity all come from that table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import os
import re
import sys
import threading
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rosa2_dspy.provenance import segment


def quiet_libraries() -> None:
    """Library warnings and progress bars off, for a command's output or a Ray actor's log."""
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
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


@dataclass(frozen=True)
class Setting:
    """A session setting: the config it belongs to (``session``: SessionConfig, ``update``: UpdateConfig), its
    field there (which gives its type and default), what it does, and the values it may take. ``variant``: a
    method variant may set it (``rosa2@learning_rate=1e-3``); not the turn budget (one per report), nor what
    shapes the engine's one adapter (an engine serves every method of a run). ``identity``: part of a run
    folder's identity, as everything that changes what a run computes; not what only changes how (activation
    checkpointing gives the same update to the bit), so that a run may resume with it on or off."""

    config: str
    field: str
    help: str
    choices: tuple[str, ...] | None = None
    variant: bool = True
    identity: bool = True
    # what a run folder written before the setting existed ran with, when that is not today's default (a 1-tuple;
    # see session_defaults)
    legacy: tuple = ()


# name (the flag --name-with-dashes, the [session] recipe key, the run folder's config.json key) -> setting
SESSION_SETTINGS: dict[str, Setting] = {
    "turns": Setting("session", "turns", "turn budget T per conversation", variant=False),
    "samples": Setting("session", "samples", "replies sampled per weights step (candidate desirable rows)"),
    "words_max_tokens": Setting("session", "words_max_tokens", "tokens per words-step call (critique, rewrite)"),
    "clarify_check": Setting("session", "clarify_check",
                             "words step: strict asks for the problem statement only and falls back to problem + "
                             "note when the rewrite solves it or drops a number; lenient (the first design) keeps any "
                             "rewrite that keeps one number of each piece", ("strict", "lenient"), legacy=("lenient",)),
    "clarify_mode": Setting("session", "clarify_mode",
                            "words step: replace rewrites the user's words into one problem statement; append keeps "
                            "them verbatim (the prompt retry answers) and adds the Clarify module's clarification "
                            "below, checked as --clarify-check says", ("replace", "append")),
    "words_after": Setting("session", "words_after",
                           "which failed turns take the method's words step: every one its policy schedules, or the "
                           "first only (later turns keep those words, plus what the user revealed since)",
                           ("every", "first")),
    "objective": Setting("update", "objective", "weights step objective (TRL's KTOTrainer runs apo_zero_unpaired "
                                                "and kto, SFTTrainer sft)", ("apo_zero_unpaired", "kto", "sft")),
    "update_steps": Setting("update", "steps", "optimizer steps per weights step"),
    "update_batch": Setting("update", "batch_size", "rows per optimizer step, at most the rows there are (a turn's "
                                                    "rows fit one step; kto takes at least 2)"),
    "learning_rate": Setting("update", "learning_rate", "weights step learning rate"),
    "max_shift": Setting("update", "max_shift_per_session", "trust region: max L2 shift per conversation (default: "
                                                            "none)"),
    "lora_layers": Setting("update", "layers", "adapt only the last N transformer blocks: the backward stops there "
                                               "(default: every block)", variant=False),
    "adapter_dtype": Setting("update", "adapter_dtype", "the LoRA adapter's dtype: float32 (PEFT's default) or "
                                                        "model (the base weights' dtype: no casts, half the memory)",
                             ("float32", "model"), variant=False),
    "frozen_prompt": Setting("update", "frozen_prompt",
                             "weights step: run each row's prompt once without gradients, as a cached prefix, and "
                             "train on the reply columns only: cheaper by about the prompt's share of a row, and a "
                             "different update (no gradient through the prompt's positions)", legacy=(False,)),
    "prefix_per_row": Setting("update", "prefix_per_row",
                              "weights step with --frozen-prompt: rows whose scored part starts at different columns "
                              "each run on their own prefix, not all at the batch's earliest one (cheaper with "
                              "--reply-tail, and no row's update depends on the others in its batch)"),
    "share_prefix": Setting("update", "share_prefix",
                            "weights step: the prompt an update's rows share runs once, and each row only up to its "
                            "own last token (the reference forward; with --frozen-prompt the prefix and the "
                            "gradient columns too): the same update for less work, up to rounding",
                            legacy=(False,)),
    "reply_tail": Setting("update", "reply_tail",
                          "weights step: score only each reply's last N tokens, where its final answer is (0: the "
                          "whole reply; sft always scores the whole reply); with --frozen-prompt the reply's head "
                          "joins the no-gradient prefix", legacy=(None,)),
    "activation_checkpointing": Setting("update", "activation_checkpointing",
                                        "weights step: keep only each block's input and run its forward again in the "
                                        "backward pass: less memory, one more forward a step, the same update",
                                        identity=False),
    "checkpointing_min_tokens": Setting("update", "checkpointing_min_tokens",
                                        "with --activation-checkpointing: only an update forward over at least N "
                                        "gradient tokens (rows x the columns that take gradients) checkpoints; a "
                                        "smaller one keeps its few activations and is not recomputed (0: every "
                                        "forward); the same update to the bit", identity=False),
}

# what shapes the engine's one adapter (its blocks, its dtype): one value per engine, so no variant sets it, and a
# compiled artifact that brings an adapter fixes it
ADAPTER_SHAPE = tuple(name for name, s in SESSION_SETTINGS.items() if s.config == "update" and not s.variant)


def session_defaults(legacy: bool = False) -> dict[str, Any]:
    """Each session setting's default: the session's, and the weights step's (:func:`session_update_config`).
    ``legacy``: instead, what a run folder whose config.json predates a setting ran with (``Setting.legacy`` where
    the default has changed since), so that resuming it on today's defaults is refused, not silently mixed."""
    from rosa2_dspy.coadapt import SessionConfig, session_update_config

    configs = {"session": SessionConfig(), "update": session_update_config()}
    return {name: s.legacy[0] if legacy and s.legacy else getattr(configs[s.config], s.field)
            for name, s in SESSION_SETTINGS.items()}


def session_setting_type(name: str):
    """The Python type of a session setting, from its dataclass field (``float | None`` -> float)."""
    from rosa2_dspy.coadapt import SessionConfig
    from rosa2_dspy.weights import UpdateConfig

    setting = SESSION_SETTINGS[name]
    hint = typing.get_type_hints(SessionConfig if setting.config == "session" else UpdateConfig)[setting.field]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def setting_value(name: str, value: Any) -> Any:
    """A session setting's value checked against its type and choices: text (a variant) is converted, a typed
    value (a recipe's TOML) must already be of the type (an int for a float is fine; a bool or 14.5 for an int
    is not). Raises ValueError saying what it takes."""
    kind = session_setting_type(name)
    wrong = f"{name} takes {'an' if kind.__name__[0] in 'aeiou' else 'a'} {kind.__name__}, got {value!r}"
    try:
        if isinstance(value, str) and kind is bool:
            value = {"true": True, "false": False, "1": True, "0": False}[value.lower()]
        elif isinstance(value, str) and kind is not str:
            value = kind(value)
        elif kind is float and type(value) is int:
            value = float(value)
    except (ValueError, KeyError):
        raise ValueError(wrong) from None
    if value is not None and type(value) is not kind:
        raise ValueError(wrong)
    choices = SESSION_SETTINGS[name].choices
    if choices and value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def with_settings(session, update, values: dict[str, Any]):
    """(session, update) with the session settings in ``values`` (by name; others and None are ignored) set on
    the config each belongs to."""
    chosen: dict[str, dict[str, Any]] = {"session": {}, "update": {}}
    for name, value in values.items():
        if name in SESSION_SETTINGS and value is not None:
            setting = SESSION_SETTINGS[name]
            chosen[setting.config][setting.field] = value
    return dataclasses.replace(session, **chosen["session"]), dataclasses.replace(update, **chosen["update"])


def session_configs(values: dict[str, Any], *, max_tokens: int, seed: int = 0):
    """(SessionConfig, UpdateConfig) from session settings by name (missing or None: the default). The weights
    step's ``max_length`` covers a whole reply of ``max_tokens`` and its prompt."""
    from rosa2_dspy.coadapt import SessionConfig, session_update_config

    return with_settings(SessionConfig(max_tokens=max_tokens, seed=seed),
                         session_update_config(max_length=max_tokens + 512), values)


# ----------------------------------------------------------------------------- multi-turn methods


def parse_method(spec: str, settings: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """``rosa2`` or a variant ``rosa2@learning_rate=1e-3@update_steps=2``: (the method, its setting overrides).
    ``settings``: the run's session settings by name (its flags), which the overrides are checked on top of.

    Variants run in the same pool as the plain methods, on the same problems, each in its own folder (named by
    the spec), and are paired with the others in the report: a setting compared on the same conversations."""
    from rosa2_dspy.coadapt import check_policy_settings, get_policy

    name, *pairs = spec.split("@")
    policy = get_policy(name)
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in SESSION_SETTINGS or not SESSION_SETTINGS[key].variant:
            known = ", ".join(sorted(name for name, setting in SESSION_SETTINGS.items() if setting.variant))
            raise ValueError(f"{spec!r}: a variant sets name=value among {known} (e.g. rosa2@learning_rate=1e-3), "
                             f"got {pair!r}")
        try:
            overrides[key] = setting_value(key, value)
        except ValueError as exc:
            raise ValueError(f"{spec!r}: {exc}") from None
    try:  # out of range (rosa2@update_steps=0), or pointless for the method: refused here, before a run folder
        session, _ = with_settings(*session_configs(settings or {}, max_tokens=1024), overrides)
        check_policy_settings(policy, session)
    except ValueError as exc:
        raise ValueError(f"{spec!r}: {exc}") from None
    return name, overrides


@dataclass(frozen=True)
class _MethodItem:
    """One conversation of a comparison: a method and a problem."""

    method: str
    example: Any

    @property
    def unique_id(self) -> str:
        return self.example.unique_id


@contextlib.contextmanager
def comparison_solver(program, engine, methods: list[str], *, user: str = "vague", session=None, update=None):
    """The solver of a comparison's conversations, ``solve(item) -> record`` for a :class:`_MethodItem`: one
    :class:`~rosa2_dspy.coadapt.Session` per method (a variant with its own settings), all on ``engine``, each
    conversation from the engine's weights now. The same solver runs in this process or in a Ray actor."""
    import dspy

    from rosa2_dspy.coadapt import Session, SessionConfig, get_policy, session_update_config
    from rosa2_dspy.math.users import make_user
    from rosa2_dspy.weights import LoRAUpdater

    session = session or SessionConfig()
    update = update or session_update_config(max_length=session.max_tokens + 512)
    # DSPy's cache, in memory for this run only: a request repeated under the same weights (turn 1 is
    # the same for every method) is answered once; a rerun measures afresh. Weights are in the key.
    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=True)
    dspy.configure(lm=engine.lm(cache=True, max_tokens=session.max_tokens, temperature=0.0))
    updaters = [LoRAUpdater(engine, update)]  # one per distinct update config (a variant may set its own)
    configs = {}
    for method in methods:
        variant_session, variant_update = with_settings(session, update, parse_method(method)[1])
        updater = next((u for u in updaters if u.config == variant_update), None)
        if updater is None:
            updaters.append(updater := LoRAUpdater(engine, variant_update))
        configs[method] = (variant_session, updater)
    with contextlib.ExitStack() as stack:
        sessions = {m: stack.enter_context(Session(program, engine, dataclasses.replace(
            get_policy(parse_method(m)[0]), name=m), make_user(user, session.seed), configs[m][0],
            updater=configs[m][1])) for m in methods}
        yield lambda item: sessions[item.method].run(item.example)


def compare_methods(program, examples: list, methods: list[str], out: str | Path, *, engine, user: str = "vague",
                    session=None, update=None, threads: int = 32, notes: list[str] | None = None,
                    progress: bool = True, workers=None) -> Path:
    """Each method's conversations on the same problems, seeds and turn budget, every one from the engine's
    weights now; ``out/<method>/results.jsonl`` (resumable), then summary.json, report.md and report.html.
    ``threads``: conversations in flight, all methods together (the first problems' conversations finish first, so
    a run cut short keeps what it finished). A method may be a variant (:func:`parse_method`).
    ``workers`` (:class:`~rosa2_dspy.distributed.RayWorkers`): the conversations run there, each actor on its
    own engine built from the same run (``program`` and ``engine`` are not used here). Returns the report's
    path."""
    from rosa2_dspy.coadapt import SessionConfig
    from rosa2_dspy.evaluation import ResultsFile, run_items
    from rosa2_dspy.report import build_report

    out = Path(out)
    session = session or SessionConfig()
    results = {}
    for method in methods:
        (out / method).mkdir(parents=True, exist_ok=True)
        results[method] = ResultsFile(out / method / "results.jsonl")
        done = sum(1 for e in examples if e.unique_id in results[method].records)
        if done:
            print(f"{method}: resuming, {done} of {len(examples)} problems already done")
    # Every method's conversations in one pool, problem by problem: the engine batches them together (no
    # method ends on a tail of one long reply decoding alone), and a problem's turn 1, the same request
    # for every method, is generated once (the engine joins identical requests in flight).
    items = [_MethodItem(m, e) for e in examples for m in methods]
    pooled = dict(threads=threads, description=", ".join(methods), progress=progress)
    def left() -> int:
        return sum(1 for item in items if item.unique_id not in results[item.method].records)

    if workers is not None:
        with segment(out) as line:
            run_items(items, None, lambda item: results[item.method], workers=workers, **pooled)
            line["items_left"] = left()
    else:
        # a problem's turn 1 (and any greedy request repeated) is answered once in this run, whichever segment a
        # method's conversation runs in (engine.remember_greedy)
        with comparison_solver(program, engine, methods, user=user, session=session, update=update) as solve, \
                segment(out, engine) as line, engine.remember_greedy(out / "greedy.jsonl"):
            run_items(items, solve, lambda item: results[item.method], status=engine.load_line,
                      abort=engine.refusing, **pooled)
            line["items_left"] = left()
    return build_report(out, methods, session.turns, title=f"rosa2 - {user} user, T={session.turns}",
                        ids=[e.unique_id for e in examples], notes=notes)


# ----------------------------------------------------------------------------- one pass


def engine_facts(engine) -> dict:
    """What a summary says of the engine a run used: model, weights, device, dtype and its batch counters."""
    return {"model": engine.name, "weights_id": engine.weights_id, "device": str(engine.device),
            "dtype": engine.info.get("dtype"), "prepacked": engine.prepacked, "engine_batches": dict(engine.stats)}


@contextlib.contextmanager
def evaluation_solver(program, engine, *, max_tokens: int = 1024, temperature: float = 0.0, cache: bool = False):
    """The solver of a one-pass evaluation, ``solve(example) -> record`` (graded), here or in a Ray actor."""
    import dspy

    from rosa2_dspy.evaluation import solve_math

    dspy.configure(lm=engine.lm(cache=cache, max_tokens=max_tokens, temperature=temperature))
    yield lambda example: solve_math(program, example)


def evaluate(program, examples: list, out: str | Path, *, engine, threads: int = 32, max_tokens: int = 1024,
             temperature: float = 0.0, cache: bool = False, progress: bool = True, description: str = "eval",
             workers=None) -> dict:
    """One pass of ``program`` over ``examples`` on ``engine``, graded; ``out/results.jsonl`` (resumable).
    Returns the summary of the requested problems (throughput only from those this call ran). ``workers``: as
    in :func:`compare_methods` (the engine facts of the summary then come from its first actor)."""
    from rosa2_dspy.evaluation import ResultsFile, run_items, summarize

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = ResultsFile(out / "results.jsonl")
    ran_now = [e.unique_id for e in examples if e.unique_id not in results.records]
    if len(ran_now) < len(examples):
        print(f"resuming: {len(examples) - len(ran_now)} of {len(examples)} problems already in "
              f"{out / 'results.jsonl'}")
    if workers is not None:
        with segment(out) as line:
            wall = run_items(examples, None, results, workers=workers, description=description, progress=progress)
            line["items_left"] = sum(1 for e in examples if e.unique_id not in results.records)
        facts = workers.engine_facts()
    else:
        with evaluation_solver(program, engine, max_tokens=max_tokens, temperature=temperature, cache=cache) as solve, \
                segment(out, engine) as line:
            wall = run_items(examples, solve, results, threads=threads, description=description, progress=progress,
                             status=engine.load_line, abort=engine.refusing)
            line["items_left"] = sum(1 for e in examples if e.unique_id not in results.records)
        facts = engine_facts(engine)
    # only the requested problems (a run folder may hold more, from a larger --limit)
    records = [results.records[e.unique_id] for e in examples if e.unique_id in results.records]
    ran = [results.records[uid] for uid in ran_now if uid in results.records]
    summary = summarize(records, wall_seconds=wall, new_records=ran, max_tokens=max_tokens)
    summary.update({**facts, "threads": threads})
    return summary


# ----------------------------------------------------------------------------- compile time


class _DSPyErrors:
    """Collects the errors DSPy's optimizers log and carry on from while compiling (BetterTogether, for one,
    logs a failed step and returns the best program so far); DSPy's log stream is off in this CLI. First line
    of each, without colour codes; the per-example parse failures of evaluation are not collected."""

    def __enter__(self):
        self.messages: list[str] = []
        handler = logging.Handler(level=logging.ERROR)
        handler.emit = lambda record: self.messages.append(
            re.sub(r"\x1b\[[0-9;]*m", "", record.getMessage()).strip().split("\n")[0][:500])
        self._handler, self._logger = handler, logging.getLogger("dspy.teleprompt")
        self._logger.addHandler(handler)
        return self

    def __exit__(self, *exc) -> None:
        self._logger.removeHandler(self._handler)
        self.messages = [m for m in self.messages if m and m != "Traceback:"]


def compile_program(program_spec: str, recipe_path: str, trainset: list, valset: list, out: str | Path, *,
                    engine, program_kwargs: dict | None = None, max_tokens: int = 1024, threads: int = 8,
                    meta: dict | None = None) -> tuple[dict, dict]:
    """Compile the program at ``program_spec`` with a recipe from the engine's base weights; save the artifact
    (``out``: program.json, adapter/, compile.json with ``meta`` and what the compile did).

    Returns (compile meta, instructions after)."""
    import dspy

    from rosa2_dspy.artifacts import instructions_of, save_compiled
    from rosa2_dspy.engine import LocalLM
    from rosa2_dspy.program_loader import load_program
    from rosa2_dspy.recipes import build_optimizer, load_recipe, update_config
    from rosa2_dspy.weights import adapter_shift, local_finetunable_lm

    recipe = load_recipe(recipe_path)
    program_kwargs = dict(program_kwargs or {})
    program = load_program(program_spec, **program_kwargs)
    if engine.has_adapter:
        engine.reset_adapter()  # every compile starts from the base weights
    lm = local_finetunable_lm(engine, update_config(recipe, objective="sft"), pinned=True, cache=False,
                              max_tokens=max_tokens, temperature=0.0)
    dspy.configure(lm=lm)
    program.set_lm(lm)
    before = instructions_of(program)
    optimizer = build_optimizer(recipe, engine, num_threads=threads)
    accepted = inspect.signature(optimizer.compile).parameters
    compile_kwargs = {"trainset": trainset, **getattr(optimizer, "compile_kwargs", {})}
    if valset and "valset" in accepted:
        compile_kwargs["valset"] = valset
    started = time.perf_counter()
    with _DSPyErrors() as dspy_errors:
        compiled = optimizer.compile(program, **compile_kwargs)
    seconds = round(time.perf_counter() - started, 1)
    history = getattr(optimizer, "history", None) or getattr(compiled, "words_history", None)
    if getattr(compiled, "candidate_programs", None):  # BetterTogether: each strategy's score
        history = [{"strategy": c.get("strategy") or "original", "score": c.get("score")}
                   for c in compiled.candidate_programs]
    for message in dspy_errors.messages:
        print(f"{Path(recipe_path).stem}: DSPy reported: {message}", file=sys.stderr)
    meta = {
        "command": "compile", "program": program_spec, "program_kwargs": program_kwargs, **(meta or {}),
        "recipe": recipe.to_dict(), "recipe_text": recipe.text,
        "train_ids": [e.unique_id for e in trainset], "val_ids": [e.unique_id for e in valset],
        "instructions_before": before, "seconds": seconds, "history": history, "dspy_errors": dspy_errors.messages,
    }
    # the compiled program's LM is pinned to its weights; make them current before saving
    pinned = next((p.lm.pinned_weights for p in compiled.predictors() if getattr(p.lm, "pinned_weights", None)),
                  None)
    if pinned:
        engine.use_pinned(pinned)
    meta["adapter_l2_shift"] = round(adapter_shift(engine).total, 6)
    save_compiled(out, compiled, engine, meta)
    for held in {id(p.lm): p.lm for p in compiled.predictors() if isinstance(p.lm, LocalLM)}.values():
        held.close()  # the artifact holds the weights now; release the compiled program's and the student's holds
    lm.close()
    return meta, instructions_of(compiled)


def compare_compiled(methods: dict[str, str | None], program_spec: str, trainset: list, valset: list, tests: list,
                     out: str | Path, *, engine, program_kwargs: dict | None = None, max_tokens: int = 1024,
                     threads: int = 8, meta: dict | None = None, progress: bool = True) -> dict[str, dict]:
    """Each recipe (``methods``: name -> recipe path; None: the uncompiled baseline) compiled from the base
    weights on the same training problems, then evaluated on the same held-out problems. Resumable: finished
    artifacts (``out/<name>/artifact``) and results are kept; ``kill -USR1`` stops it between phases
    (:func:`_drain_between_methods`); an interrupt (Ctrl-C, or SIGTERM through the CLI) stops it at once, a compile
    under way lost (:func:`_let_go_when_interrupted`). Returns each finished method's summary (or its error)."""
    out = Path(out)
    summaries = {}
    with _drain_between_methods() as draining, _let_go_when_interrupted(engine):
        for name, recipe in methods.items():
            if draining.is_set():
                print(f"stopped before {name}: run the same command again to go on", file=sys.stderr, flush=True)
                break
            summary = _compile_and_evaluate(name, recipe, program_spec, trainset, valset, tests, out, engine=engine,
                                            program_kwargs=program_kwargs, max_tokens=max_tokens, threads=threads,
                                            meta=meta, progress=progress, draining=draining)
            if summary is None:  # compiled and saved, then stopped before its evaluation
                print(f"stopped after compiling {name}: run the same command again to go on", file=sys.stderr,
                      flush=True)
                break
            summaries[name] = summary
            if not compile_method_done(summary, len(tests)):
                draining.set()  # its evaluation was drained (kill -USR1 while it ran): stop here too
    return summaries


def _drain_between_methods():
    """``kill -USR1`` (evaluation.DRAIN_SIGNAL) during a ``bench compile``: the compile under way finishes and is
    saved, then the run stops before the next phase (a compile killed midway starts again from nothing). During
    an evaluation, the evaluation's own drain takes the signal: it stops with the items in flight, and the caller
    sees its problems fall short. Yields the event that says a stop was asked for."""
    from rosa2_dspy.evaluation import drain_signal

    return drain_signal(lambda: print("stopping after the phase under way (a compile finishes and is saved first); "
                                      "run the same command again to go on", file=sys.stderr, flush=True))


@contextlib.contextmanager
def _let_go_when_interrupted(engine, wait: float = 60.0):
    """An interrupt during a compile arrives in the main thread while DSPy's executor threads (bootstrapping,
    evaluating candidates) wait on the engine; DSPy cancels them on SIGINT alone, and the interpreter would wait at
    exit for each to finish its problem. Let them go as an interrupted evaluation does: inside
    ``engine.refusing()`` their requests fail at once, and they are waited for (at most ``wait`` seconds) before
    the interrupt goes on."""
    try:
        yield
    except KeyboardInterrupt:
        with engine.refusing("the compile is being stopped"):
            deadline = time.monotonic() + wait
            for thread in threading.enumerate():
                if thread is not threading.current_thread() and not thread.daemon:
                    thread.join(max(0.0, deadline - time.monotonic()))
        raise


def compile_method_done(summary: dict | None, problems: int) -> bool:
    """Whether a ``bench compile`` method is through: its compile failed (a result), or it answered all
    ``problems``; not when it was stopped before or during its evaluation."""
    return summary is not None and ("error" in summary or summary.get("problems", 0) >= problems)


def _compile_and_evaluate(name: str, recipe: str | None, program_spec: str, trainset: list, valset: list,
                          tests: list, out: Path, *, engine, program_kwargs, max_tokens, threads, meta,
                          progress, draining: threading.Event) -> dict | None:
    """One method of :func:`compare_compiled`: its compile (unless its artifact is there), then its evaluation;
    None when a stop was asked for (``draining``) before the evaluation began."""
    from rosa2_dspy.artifacts import load_compiled, read_meta
    from rosa2_dspy.fsutil import read_jsonl
    from rosa2_dspy.program_loader import load_program

    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    compiled = {}
    if recipe is not None:
        artifact = folder / "artifact"
        if not (artifact / "compile.json").exists():
            print(f"{name}: compiling on {len(trainset)} problems")
            try:
                compile_program(program_spec, recipe, trainset, valset, artifact, engine=engine,
                                program_kwargs=program_kwargs, max_tokens=max_tokens, threads=threads, meta=meta)
            except Exception as exc:  # noqa: BLE001 - one method failing is a result; the others still run
                print(f"{name}: compile failed: {type(exc).__name__}: {exc}")
                return {"error": f"{type(exc).__name__}: {exc}"[:300]}
        compiled = read_meta(artifact)
    if draining.is_set():
        return None
    program = load_program(program_spec, **(program_kwargs or {}))
    if engine.has_adapter:
        engine.reset_adapter()
    answered = read_jsonl(folder / "results.jsonl")
    if recipe is not None and not {e.unique_id for e in tests} <= {r["unique_id"] for r in answered}:
        load_compiled(folder / "artifact", program, engine)  # (an evaluation already through needs no weights:
        # a run folder packed without its adapters resumes on another machine)
    summary = evaluate(program, tests, folder, engine=engine, threads=threads, max_tokens=max_tokens,
                       progress=progress, description=f"eval {name}")
    summary.update({"compile_seconds": compiled.get("seconds"),
                    "adapter_l2_shift": compiled.get("adapter_l2_shift", 0.0),
                    "instructions_changed": sorted(k for k, v in (compiled.get("instructions") or {}).items()
                                                   if v != (compiled.get("instructions_before") or {}).get(k))})
    return summary


__all__ = ["SESSION_SETTINGS", "Setting", "compare_compiled", "compare_methods", "compile_method_done",
           "compile_program", "evaluate", "parse_method", "session_configs", "session_defaults"]
