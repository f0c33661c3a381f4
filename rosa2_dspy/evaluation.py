"""Evaluating a prompt program on MATH problems: resumable JSONL results, a summary, a table.

A run folder holds ``config.json`` (what was asked), ``results.jsonl`` (one line per finished
problem, appended and flushed as each finishes) and ``summary.json`` (rewritten atomically at the
end). Rerunning the same command skips finished ids; a half-written last line from a killed run
is dropped and rewritten, nothing else is touched.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
import os
import signal
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable

import dspy
from dspy.utils.exceptions import AdapterParseError

from rosa2_dspy.faults import failpoint
from rosa2_dspy.fsutil import append_jsonl, read_jsonl, write_json_atomic
from rosa2_dspy.math.grading import grade
from rosa2_dspy.progress import progress_line

RESULTS = "results.jsonl"
SUMMARY = "summary.json"
CONFIG = "config.json"


class RunError(ValueError):
    """The output folder cannot be used for this run; the message says why."""


class ResultsFile:
    """Append-only JSONL of finished items, keyed by ``unique_id``; safe to resume. ``repair``: drop a line torn
    by a killed run from the file (that item simply runs again); a reader of a run that may still be going (a
    report) leaves the file alone, since its writer may be mid-line."""

    def __init__(self, path: Path, *, repair: bool = True):
        self.path = path
        self._lock = threading.Lock()
        self.records: dict[str, dict] = {record["unique_id"]: record for record in read_jsonl(path, repair=repair)}

    def append(self, record: dict) -> None:
        with self._lock:
            append_jsonl(self.path, record, durable=True)
            self.records[record["unique_id"]] = record
        failpoint("results.appended")


def prepare_run_dir(out: str | os.PathLike, config: dict, *, resume_keys: tuple[str, ...],
                    defaults: dict | None = None) -> Path:
    """Create (or reopen) a run folder; refuse one that holds a run with different settings. ``defaults``: the
    value a setting had before it existed, for a folder whose config.json predates it (a run resumed on newer
    code is refused only if it asks for something else than what it ran with)."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise RunError(f"output folder {str(out)!r} is not writable: {exc.strerror or exc}") from None
    config_path = out / CONFIG
    if config_path.exists():
        try:
            old = json.loads(config_path.read_text())
        except json.JSONDecodeError:
            raise RunError(f"{config_path} is not valid JSON; move the folder aside or use another --out") from None
        old = {**{k: v for k, v in (defaults or {}).items() if k not in old}, **old}
        differs = [k for k in resume_keys if old.get(k) != config.get(k)]
        if differs:
            detail = ", ".join(f"{k}: {old.get(k)!r} -> {config.get(k)!r}" for k in differs)
            raise RunError(f"{out} holds a run with other settings ({detail}); to resume it, ask for the settings "
                           "it holds (left of each arrow), or use another --out")
    write_json_atomic(config_path, config)
    return out


def error_record(item, exc: BaseException) -> dict:
    """The record of an item whose solving raised: wrong, with the error, so the run goes on."""
    return {"unique_id": item.unique_id, "correct": False, "error": f"{type(exc).__name__}: {exc}"[:500]}


def solve_guarded(solve: Callable[[Any], dict], item) -> dict:
    """``solve(item)``, or its :func:`error_record` if it raises (here or in a Ray actor)."""
    try:
        return solve(item)
    except Exception as exc:  # noqa: BLE001
        return error_record(item, exc)


class _LocalWorkers:
    """Items solved on threads of this process (a batching engine sees their requests at once). Leaving on an
    exception (an interrupt: Ctrl-C, SIGTERM) the items not started are dropped, and those in flight are let go
    inside ``abort()`` (a context manager, :meth:`~rosa2_dspy.engine.LocalEngine.refusing`), which makes them
    fail fast: waiting for each to end would hold an interrupted comparison for its longest conversation."""

    def __init__(self, solve: Callable[[Any], dict], threads: int,
                 abort: Callable[[], contextlib.AbstractContextManager] | None = None):
        self.solve, self.pool = solve, ThreadPoolExecutor(max_workers=max(1, threads))
        self.abort = abort

    def submit(self, item) -> Future:
        return self.pool.submit(contextvars.copy_context().run, solve_guarded, self.solve, item)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc) -> None:
        letting_go = self.abort() if exc_type is not None and self.abort is not None else contextlib.nullcontext()
        with letting_go:
            self.pool.shutdown(wait=True, cancel_futures=True)


DRAIN_SIGNAL = signal.SIGUSR1  # kill -USR1 <pid>: a long run starts nothing new and stops once its items in flight end


@contextlib.contextmanager
def drain_signal(on_drain: Callable[[], None] | None = None):
    """While open, ``DRAIN_SIGNAL`` sets the event it yields (and runs ``on_drain``) instead of ending the process:
    a long run checks the event and starts nothing new. Only the main thread can take a signal; elsewhere none is
    taken and the event is never set."""
    draining = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield draining
        return

    def drain(signum, frame):
        draining.set()
        if on_drain is not None:
            on_drain()

    previous = signal.signal(DRAIN_SIGNAL, drain)
    try:
        yield draining
    finally:
        signal.signal(DRAIN_SIGNAL, previous)


def _drain_on_signal(futures: dict[Future, Any], description: str):
    """:func:`drain_signal` while a run submits and waits for its items (``futures``, filled inside): on
    ``DRAIN_SIGNAL``, cancel every item not yet started, so that the run ends once those in flight have finished
    and been written (killing it would lose them: a conversation resumes from its start). The event it yields
    says a drain was asked for, so that no item is submitted after it."""

    def cancel():
        cancelled = sum(future.cancel() for future in list(futures))
        running = sum(not future.done() for future in futures)
        print(f"{description}: stopping: {cancelled} not started, {running} in flight will finish and be saved; "
              f"run the same command again to go on", file=sys.stderr, flush=True)

    return drain_signal(cancel)


def _as_completed_awake(futures):
    """``as_completed``, waking every second (yielding None when nothing finished): a signal sent to the process
    may land on another thread, and the main thread runs its handler only once it is back in Python (a blocked
    wait would hold it until an item ends, an hour for a long conversation); and a log hears from a run whose
    items take long."""
    pending = set(futures)
    while pending:
        finished, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
        yield from finished or [None]


def run_items(items: list, solve: Callable[[Any], dict] | None, results: ResultsFile | Callable[[Any], ResultsFile],
              *, threads: int = 1, description: str = "problems", progress: bool = True, workers=None,
              status: Callable[[], str] | None = None,
              abort: Callable[[], contextlib.AbstractContextManager] | None = None) -> float:
    """Run ``solve`` on the items not yet in ``results``, appending each record as it finishes.

    Items run on ``threads`` threads, so a batching engine sees concurrent requests; or, given ``workers``
    (an object whose ``submit(item)`` returns a future of the item's record, such as
    :class:`~rosa2_dspy.distributed.RayWorkers`), wherever those run it. ``results`` is one file, or a function
    giving each item's (several methods' conversations in one pool, each method's records in its own file);
    only this process writes them.
    Returns the wall time spent. An exception inside ``solve`` is ``solve``'s to record; anything escaping it
    is recorded here as an error for that item and the run goes on. ``kill -USR1`` stops the run early without
    losing work (:func:`_drain_on_signal`); ``status`` adds a few words to each progress line of a log.
    Interrupted (an exception in this thread: Ctrl-C, or SIGTERM through the CLI), it keeps what finished and
    lets the items in flight go inside ``abort()`` (:class:`_LocalWorkers`), so it ends promptly.
    """
    file_of = results if callable(results) else (lambda item: results)
    todo = [item for item in items if item.unique_id not in file_of(item).records]
    started = time.perf_counter()
    if not todo:
        return 0.0
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    # a terminal gets a live bar; a log file (nohup, CI) a plain line at most once a minute when items finish,
    # every 5 minutes when none does, and at the end
    plain = progress and not Console(stderr=True).is_terminal
    last_line = started
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("acc {task.fields[acc]}"), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not progress or plain, transient=False) as bar:
        task = bar.add_task(description, total=len(todo), acc="-")
        correct = 0

        with (workers if workers is not None else _LocalWorkers(solve, threads, abort)) as pool:
            futures: dict[Future, Any] = {}
            done = 0
            with _drain_on_signal(futures, description) as draining:
                for item in todo:  # (items start as they are submitted: the handler is in place first)
                    if draining.is_set():
                        break
                    futures[pool.submit(item)] = item
                for future in _as_completed_awake(futures):
                    if future is not None and not future.cancelled():
                        record = future.result()
                        file_of(futures[future]).append(record)
                        done += 1
                        correct += bool(record.get("correct") or record.get("solved"))  # an answer, a conversation
                        bar.update(task, advance=1, acc=f"{correct / done:.0%}")
                    now = time.perf_counter()
                    if plain and (now - last_line >= (60 if future is not None else 300) or done == len(todo)):
                        last_line = now
                        extra = status() if status is not None else ""
                        print(progress_line(description, done, len(todo), correct, now - started)
                              + (f" ({extra})" if extra else ""), file=sys.stderr, flush=True)
    return time.perf_counter() - started


def solve_math(program: dspy.Module, example: dspy.Example, *, engine=None) -> dict:
    """Run the program on one MATH example and grade it; parse failures count as wrong."""
    from rosa2_dspy.engine import usage_scope

    record: dict[str, Any] = {"unique_id": example.unique_id, "subject": example.subject, "level": example.level,
                              "gold": example.answer}
    started = time.perf_counter()
    with usage_scope() as usage:
        try:
            prediction = program(**example.inputs())
            answer = prediction.get("answer") if hasattr(prediction, "get") else getattr(prediction, "answer", None)
            record["prediction"] = answer
            record["reasoning"] = prediction.get("reasoning") if hasattr(prediction, "get") else None
            record["parse_error"] = None
        except AdapterParseError as exc:
            answer = None
            record["prediction"] = None
            record["reasoning"] = exc.lm_response
            record["parse_error"] = (str(exc).splitlines() or ["parse error"])[0][:300]
    record["seconds"] = round(time.perf_counter() - started, 3)
    record["input_tokens"], record["output_tokens"] = usage["input_tokens"], usage["output_tokens"]
    judged = grade(answer, example.answer) if answer is not None else None
    record.update({
        "correct": bool(judged and judged.correct),
        "strict": bool(judged and judged.strict),
        "boxed": bool(judged and judged.boxed),
        "extracted": judged.extracted if judged else None,
        "grade_note": judged.reason if judged else record["parse_error"],
        "grade_fallback": bool(judged and judged.fallback),
    })
    return record


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a proportion (sound at small n and at 0 or 1)."""
    if n == 0:
        return (0.0, 0.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def summarize(records: list[dict], *, wall_seconds: float, new_records: list[dict] | None = None,
              max_tokens: int | None = None) -> dict:
    """Accuracy and friends over ``records``; throughput over ``new_records``, those this run generated in
    ``wall_seconds`` (none: no throughput, rather than a figure from another run)."""
    n = len(records)
    count = lambda key: sum(1 for r in records if r.get(key))  # noqa: E731
    correct = count("correct")
    out_tokens = sum(r.get("output_tokens") or 0 for r in records)
    low, high = wilson_interval(correct, n)
    summary = {
        "problems": n,
        "accuracy": correct / n if n else 0.0,
        "accuracy_ci95": [low, high],
        "strict_accuracy": count("strict") / n if n else 0.0,
        "boxed_rate": count("boxed") / n if n else 0.0,
        "parse_failure_rate": count("parse_error") / n if n else 0.0,
        "errors": count("error"),
        "grade_fallbacks": count("grade_fallback"),  # math-verify could not judge: the strict match decided
        "output_tokens": out_tokens,
        "mean_output_tokens": out_tokens / n if n else 0.0,
    }
    if max_tokens:  # replies cut by the budget: a sign that it is too small for the model
        summary["hit_token_cap_rate"] = sum(1 for r in records if (r.get("output_tokens") or 0) >= max_tokens) / n \
            if n else 0.0
    if new_records:
        new_tokens = sum(r.get("output_tokens") or 0 for r in new_records)
        summary.update({
            "problems_run_now": len(new_records),
            "wall_seconds": round(wall_seconds, 2),
            "seconds_per_problem": round(wall_seconds / len(new_records), 3),
            "tokens_per_second": round(new_tokens / wall_seconds, 2) if wall_seconds else None,
        })
    return summary


def math_metric(keep: str = "correct") -> Callable[..., float]:
    """A DSPy metric ``(example, prediction, trace=None) -> float`` for filtering traces.

    ``keep="correct"``: 1.0 when the answer grades as correct. ``keep="boxed"``: 1.0 when the reply
    has a parseable boxed answer at all (the format gap the small model has); used to bootstrap
    format-following traces when almost nothing is correct.
    """
    if keep not in ("correct", "boxed"):
        raise ValueError(f"keep must be 'correct' or 'boxed', got {keep!r}")

    def metric(example, prediction, trace=None, *args, **kwargs) -> float:
        answer = getattr(prediction, "answer", None) if prediction is not None else None
        if answer is None:
            return 0.0
        judged = grade(answer, example.answer)
        return float(judged.correct if keep == "correct" else judged.boxed)

    metric.__name__ = f"math_{keep}"
    return metric
