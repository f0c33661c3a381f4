"""The engine's scheduler: the request queue, the batching worker and the usage accounting.

Requests (token ids and :class:`~rosa2_dspy.engine.settings.GenSettings`) are queued as jobs; one worker
thread per engine collects them into batches (:meth:`SchedulerMixin._serve`) or a continuously refilled
running batch (:meth:`SchedulerMixin._serve_continuous`), and holds batches back while weight updates
are announced (:meth:`SchedulerMixin.updating`). Identical greedy requests for pinned weights join the
one in flight. :func:`usage_scope` counts what a thread's requests spent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import queue
import threading
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rosa2_dspy.engine.settings import Completion, GenSettings
from rosa2_dspy.faults import failpoint
from rosa2_dspy.fsutil import append_jsonl, read_jsonl
from rosa2_dspy.memory import release_free_heap

logger = logging.getLogger(__name__)

_usage = threading.local()


class EngineStopped(RuntimeError):
    """A request or weight update the engine refused, or cut short: the run that made it is being stopped
    (:meth:`SchedulerMixin.refusing`)."""


def _fail(future: Future, exc: BaseException) -> None:
    """Fail a request's future unless it has its outcome already (a refused request may still finish)."""
    with contextlib.suppress(InvalidStateError):
        future.set_exception(exc)


def _start(job: "_Job") -> bool:
    """Mark a queued job running; False if its caller no longer waits for it (cancelled, or failed by a refusal)."""
    if job.future.done():  # (set_running_or_notify_cancel would log a CRITICAL line before raising)
        return False
    try:
        return job.future.set_running_or_notify_cancel()
    except RuntimeError:  # failed by a refusal in between
        return False


@contextlib.contextmanager
def usage_scope():
    """Count the tokens that local engines spend on behalf of this thread inside the block, and the
    machine time they take (``compute_seconds``: each batch's time shared among its rows)."""
    outer = getattr(_usage, "counter", None)
    counter = {"input_tokens": 0, "output_tokens": 0, "calls": 0, "compute_seconds": 0.0}
    _usage.counter = counter
    try:
        yield counter
    finally:
        _usage.counter = outer
        if outer is not None:
            for key, value in counter.items():
                outer[key] += value


def count_usage(completion: "Completion") -> None:
    """Add a completion to the thread's :func:`usage_scope` (done for you by ``generate_one``)."""
    counter = getattr(_usage, "counter", None)
    if counter is not None:
        counter["input_tokens"] += completion.input_tokens
        counter["output_tokens"] += completion.output_tokens
        counter["calls"] += 1
        counter["compute_seconds"] += completion.compute_seconds


class _GreedyMemory:
    """Completed greedy requests of one run, by request: in memory, and appended to a JSONL file (one line per
    request: a digest of the token ids, settings and stop strings, and the completion) so that a later
    segment of the run reads them back. A torn last line is skipped."""

    def __init__(self, path: Path):
        self.path, self._lock, self._known = path, threading.Lock(), {}
        for item in read_jsonl(path):
            with contextlib.suppress(KeyError, TypeError):
                self._known[item["request"]] = Completion(**item["completion"])

    @staticmethod
    def _digest(key: tuple) -> str:
        input_ids, settings, stop = key
        text = json.dumps([list(input_ids), dataclasses.asdict(settings), list(stop)], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def get(self, key: tuple) -> Completion | None:
        with self._lock:
            return self._known.get(self._digest(key))

    def add(self, key: tuple, done: Completion) -> None:
        if done.shared:
            return
        digest = self._digest(key)
        with self._lock:
            if digest in self._known:
                return
            self._known[digest] = done
            append_jsonl(self.path, {"request": digest, "completion": dataclasses.asdict(done)})


@dataclass(eq=False)  # jobs are compared by identity: identical requests are still distinct jobs
class _Job:
    input_ids: list[int]
    settings: GenSettings
    stop: tuple[str, ...]
    future: Future = field(default_factory=Future)
    remember: Any = None  # (the run's memory, the request) when the completion is to be remembered

    def complete(self, completion: Completion) -> None:
        """Give the caller its completion, remembered first (so the run's file has it when the caller goes on)."""
        if self.remember is not None:
            memory, key = self.remember
            memory.add(key, completion)
        with contextlib.suppress(InvalidStateError):  # its caller was let go (refusing): the reply is unused
            self.future.set_result(completion)


def _failed(exc: BaseException) -> Future:
    future: Future = Future()
    future.set_exception(exc)
    return future


def _share_result(first: Future, joined: Future) -> None:
    """Complete a joined request with its first request's outcome (a completion of its own, marked shared)."""
    exc = first.exception()
    if exc is not None:
        joined.set_exception(exc)
        return
    joined.set_result(_as_shared(first.result()))


def _as_shared(done: Completion) -> Completion:
    """Another request's completion handed to an identical one: no tokens or time of its own."""
    return replace(done, input_tokens=0, output_tokens=0, compute_seconds=0.0, shared=True)


class SchedulerMixin:
    """The queue and the batching worker of :class:`~rosa2_dspy.engine.LocalEngine`."""

    def generate_one(self, messages: list[dict], settings: GenSettings, stop: tuple[str, ...] = ()) -> Completion:
        """Queue one chat for generation and wait for it (batched with concurrent callers)."""
        completion = self.submit(self.encode_chat(messages), settings, stop).result()
        count_usage(completion)
        return completion

    def submit(self, input_ids: list[int], settings: GenSettings, stop: tuple[str, ...] = ()) -> Future:
        """Queue one prompt (token ids); the future gives its :class:`Completion`. Prompts queued
        together (by one caller or by many threads) share batches where their settings allow."""
        # Greedy decoding of pinned weights (ids are content hashes) is a function of the request: an identical
        # request in flight joins it, as DSPy's cache would answer it had the first one finished, and one that a
        # run already answered (remember_greedy) is answered again from there. Its completion says ``shared`` and
        # counts no tokens or time (the first request's thread counted them).
        refusal = self._refusal
        if refusal is not None:
            return _failed(EngineStopped(refusal))
        key = (tuple(input_ids), settings, tuple(stop)) if not settings.do_sample and settings.weights else None
        remembered = self._remembered
        if key is not None and remembered is not None:
            known = remembered.get(key)
            if known is not None:
                self.stats["remembered"] += 1
                done: Future = Future()
                done.set_result(_as_shared(known))
                return done
        with self._inflight_lock:
            if self._refusal is not None:  # (refusing() sets it, then fails the live jobs under this lock)
                return _failed(EngineStopped(self._refusal))
            first = self._inflight.get(key) if key is not None else None
            if first is not None:
                self.stats["joined"] += 1
                joined: Future = Future()
                first.add_done_callback(lambda done: _share_result(done, joined))
                return joined
            job = _Job(list(input_ids), settings, stop)
            self._live.add(job)
            job.future.add_done_callback(lambda done: self._forget_live(job))
            if key is not None:
                self._inflight[key] = job.future
                job.future.add_done_callback(lambda done: self._forget_inflight(key, done))
                if remembered is not None:
                    job.remember = (remembered, key)
        with self._worker_lock:  # a job is queued behind a live worker, never behind a switch's stop signal
            self._ensure_worker_locked()
            self._queue.put(job)
        return job.future

    @contextlib.contextmanager
    def remember_greedy(self, path: str | Path):
        """While open, greedy requests for pinned weights are written to ``path`` (JSONL) as they complete, and
        one that is already there is answered from it. A run that is stopped and resumed then gives each
        problem's turn 1 to every method, whichever segment a method's conversation runs in: regenerated in
        other batches, a bf16 reply can come out different (the tuning run showed it: a problem failed by
        ``single`` was solved at turn 1 by ``pe`` after a resume)."""
        with self._worker_lock:
            if self._remembered is not None:
                raise RuntimeError("this engine already remembers greedy requests for another run")
            self._remembered = _GreedyMemory(Path(path))
        try:
            yield self._remembered
        finally:
            with self._worker_lock:
                self._remembered = None

    @contextlib.contextmanager
    def refusing(self, reason: str = "the run is being stopped", settle: float = 60.0):
        """While open, every request the engine holds (queued, or decoding: its row leaves the batch) fails now
        with :class:`EngineStopped`, and so does every new request and every weight update about to start (one
        already training finishes; with padded batching, so does a batch already generating). A run that is
        interrupted opens it while it lets its threads go: each conversation in flight then ends within an
        update, not at its last turn. On closing it waits (at most ``settle`` seconds) until the worker is idle;
        then the engine serves again."""
        try:
            self._refusal = reason
            with self._inflight_lock:  # a request submitted from now on sees the refusal (submit)
                live = list(self._live)
            for job in live:  # (an exception each: a raised one collects the frames of the thread raising it)
                _fail(job.future, EngineStopped(reason))
            yield
            # the worker ends the step under way and drops the failed rows: a process that exits while it is
            # still inside torch aborts ("terminate called without an active exception", exit 134)
            if not self.wait_idle(settle):
                logger.warning("the engine's worker is still generating after %.0f s; exiting now may abort", settle)
        finally:
            self._refusal = None

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until the worker waits for a request (or there is none): no generation under way. True if so."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            worker = self._worker
            if worker is None or not worker.is_alive() or self._worker_idle.is_set():
                return True
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            self._worker_idle.wait(0.05 if left is None else min(left, 0.05))

    @contextlib.contextmanager
    def _waiting(self):
        """Marks the worker idle while it blocks on anything but torch work: the next request, announced weight
        updates, a test's stalled failpoint (:meth:`wait_idle`). A no-op in any other thread."""
        if threading.current_thread() is not self._worker:
            yield
            return
        self._worker_idle.set()
        try:
            yield
        finally:
            self._worker_idle.clear()

    def _next_job(self):
        """The worker's blocking read of the next request."""
        with self._waiting():
            return self._queue.get()

    def _refuse_update(self) -> None:
        refusal = self._refusal
        if refusal is not None:
            raise EngineStopped(refusal)

    def load_line(self) -> str:
        """The engine's work so far, in a few words for a long run's log: rows a decode step advanced on average,
        seconds a step, and the share of the time spent in weight updates."""
        stats = self.stats
        busy = stats["step_seconds"] + stats["update_seconds"]
        if not busy:
            return ""
        line = []
        if stats["steps"]:
            line.append(f"{stats['row_steps'] / stats['steps']:.1f} rows/step, "
                        f"{stats['step_seconds'] / stats['steps']:.2f} s/step")
        if stats["updates"]:
            line.append(f"{stats['updates']} updates, {stats['update_seconds'] / busy:.0%} of the engine's time")
        return "; ".join(line)

    def _forget_live(self, job: _Job) -> None:
        with self._inflight_lock:
            self._live.discard(job)

    def _forget_inflight(self, key: tuple, future: Future) -> None:
        with self._inflight_lock:
            if self._inflight.get(key) is future:
                del self._inflight[key]

    def _ensure_worker_locked(self) -> None:
        """Start the worker of the current batching mode if none is alive (the caller holds ``_worker_lock``)."""
        if self._worker is None or not self._worker.is_alive():
            serve = self._serve_continuous if self.continuous else self._serve
            self._worker = threading.Thread(target=serve, name=f"LocalEngine[{self.name}]", daemon=True)
            self._worker.start()

    def set_batching(self, continuous: bool) -> None:
        """Serve with continuous batching or padded batches from now on. A worker serving the other way
        finishes every request queued before the switch, then stops; the next request starts the new one."""
        with self._worker_lock:
            if continuous == self.continuous:
                return
            worker = self._worker
            if worker is not None and worker.is_alive():
                self._queue.put(None)  # the stop signal: read after everything queued before it
                worker.join()
            self._worker = None
            self.continuous = continuous

    def _serve(self) -> None:
        """Collect concurrent requests for a short window (kept open while they keep arriving) and run
        compatible ones together.

        While weight updates are announced (:meth:`updating`), no batch starts: requests keep
        arriving meanwhile, and run together once the updates have landed."""
        stopping = False  # the stop signal (set_batching) came: serve what came before it, then return
        while True:
            if not self._pending:
                if stopping:
                    return
                job = self._next_job()
                if job is None:
                    return
                self._pending.append(job)
            opened = time.monotonic()
            deadline = opened + self.batch_window
            while len(self._pending) < self.max_batch * 4 and not stopping:
                remaining = deadline - time.monotonic()
                try:
                    job = self._queue.get(timeout=max(remaining, 0)) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stopping = True
                    break
                self._pending.append(job)
                # callers still arriving (threads starting up, conversations leaving an update): wait for them
                deadline = min(time.monotonic() + self.batch_window,
                               opened + max(self.batch_window, self.batch_window_max))
            if self._wait_for_updates():
                continue  # collect what arrived while the updates ran (their callers' next requests)
            head = self._pending[0].settings.batch_key()
            batch = [job for job in self._pending if job.settings.batch_key() == head][: self.max_batch]
            self._pending = [job for job in self._pending if job not in batch]
            self._run(batch)

    def _serve_continuous(self) -> None:
        """Continuous batching: one running batch that requests join as slots free up and leave as they end
        (:class:`~rosa2_dspy.engine.continuous.ContinuousDecoder`). Greedy and sampled requests, budgets and stop
        strings mix freely; rows asking for different pinned weights get their own LoRA update per row.

        Weight updates: while one is announced no request joins. When every running row names its pinned
        weights (a session's always do), the rows pause and the updates land at once: each step sets the weights
        each row asks for, and its KV cache was computed under them, so the rows go on unchanged afterwards.
        Otherwise the update takes the weights lock between two steps, a race that the running batch can win
        step after step (so it was for every row before the pause)."""
        from rosa2_dspy.engine.continuous import ContinuousDecoder, Row

        def fresh() -> ContinuousDecoder:
            return ContinuousDecoder(self.model, self.tokenizer, self.eos_token_ids, self.tokenizer.pad_token_id,
                                     max_rows=self.max_batch, forward_context=self._rows_context)

        decoder = self._decoder = fresh()
        stopping = False  # the stop signal (set_batching) came: serve what came before it, then return
        while True:
            if decoder.rows and self._updates_waiting and all(row.tag.settings.weights for row in decoder.rows):
                self._wait_for_updates()  # the pinned rows pause; the updates land now
            if not decoder.rows:
                if not self._pending:
                    job = None if stopping else self._next_job()
                    if job is None:
                        return
                    self._pending.append(job)
                if self._wait_for_updates():
                    continue
            while not stopping:  # whatever else has arrived
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stopping = True
                else:
                    self._pending.append(job)
            # rows whose callers no longer wait (the engine is refusing: see refusing) leave before the next step
            decoder.drop([row for row in decoder.rows if row.tag.future.done()])
            joining = []
            if not self._updates_waiting:
                live = [job for job in self._pending[: decoder.free] if _start(job)]
                self._pending = self._pending[decoder.free:]
                joining = [Row(job.input_ids, job.settings.max_tokens,
                               temperature=job.settings.temperature if job.settings.do_sample else 0.0,
                               top_p=job.settings.top_p, top_k=job.settings.top_k, seed=job.settings.seed,
                               stop=job.stop, tag=job) for job in live]
            if not joining and not decoder.rows:
                continue
            try:
                if joining:  # rows about to join the running batch (the padded path's "batch about to run"); a
                    with self._waiting():  # stall here is a generation that never ends, not a lock held
                        failpoint("generate.batch")
                rows = len(decoder.rows) + len(joining)
                facts = {"rows": rows, "joining": len(joining),
                         "joining_tokens": max((len(row.input_ids) for row in joining), default=0),
                         "columns": decoder.mask.shape[1] if decoder.mask is not None else 0}
                with self.weights_lock, self.peaks.watch("step", facts, self._memory_facts):
                    started = time.perf_counter()
                    finished = decoder.step(joining)
                    self.stats["steps"] += 1
                    self.stats["row_steps"] += rows
                    self.stats["step_seconds"] += time.perf_counter() - started
            except BaseException as exc:  # noqa: BLE001 - a failed step fails the rows in it, not the worker
                for row in decoder.rows + [r for r in joining if r not in decoder.rows]:
                    _fail(row.tag.future, exc)
                decoder = self._decoder = fresh()
                continue
            self.stats["requests"] += len(finished)
            self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], len(decoder.rows) + len(finished))
            for row in finished:
                row.tag.complete(Completion(decoder.text_of(row), len(row.input_ids), len(row.generated),
                                            row.finish, row.seconds))

    def _memory_facts(self) -> dict:
        """What the engine holds beside the model (for :attr:`peaks`, read only when a phase raised the peak): the
        running rows' KV cache, the pinned adapters and the running batch's adapters side by side."""
        decoder = self._decoder
        with self._pins_lock:
            pinned = [t for state in self._pins.values() if state for t in state.values()]
            adapters = len(self._pins)
        grouped = self._grouped_cache
        mib = 1 << 20
        return {"kv_cache_mib": round((decoder.cache_bytes() if decoder is not None else 0) / mib, 1),
                "pinned_adapters": adapters, "pinned_mib": round(sum(t.nbytes for t in pinned) / mib, 1),
                "batch_adapters_mib": round(sum(a.nbytes + b.nbytes for _, a, b in grouped[1]) / mib, 1)
                if grouped else 0.0}

    def _rows_context(self, rows) -> contextlib.AbstractContextManager:
        """The weights each row of a continuous batch asks for, around one forward (see :meth:`_weights_for`)."""
        row_weights = self._weights_for([row.tag.settings.weights for row in rows])
        if row_weights is None:
            return self._uniform_context()
        self.stats["mixed_weights_batches"] += 1
        return self._per_row_adapters(row_weights)

    def _wait_for_updates(self) -> bool:
        """Block while weight updates are announced; True if it waited."""
        with self._updates:
            if not self._updates_waiting:
                return False
            self.stats["waits_for_updates"] += 1
            with self._waiting():
                while self._updates_waiting:
                    self._updates.wait()
            return True

    @contextlib.contextmanager
    def updating(self):
        """Hold the weights for a change that goes ahead of queued generation.

        Plain ``weights_lock`` alternates: one update, then a batch of whoever is ready (often one
        row), then the next update. Announced updates instead land back to back while the
        batching worker waits, so generation resumes as one large batch. Re-entrant: only the
        outermost entry counts as an update.

        The outermost entry hands the C heap's free pages back to the kernel before the change
        (what decode steps freed since the last update, so the update's own peak stacks on a lower
        base) and after it (the update's freed activations, kept per thread by glibc otherwise)."""
        self._refuse_update()
        depth = getattr(self._update_depth, "n", 0)  # this thread's updates already open around this one
        with self._updates:
            self._updates_waiting += 1
        self._update_depth.n = depth + 1
        try:
            with self.weights_lock:
                self._refuse_update()  # (refused while it waited for the update before it)
                self._weights_changing()
                if depth:
                    yield
                    return
                paused = len(self._decoder.rows) if self._decoder is not None else 0
                released = self._release_heap()
                started = time.perf_counter()
                try:
                    with self.peaks.watch("update", {"paused_rows": paused, "heap_released_before_mib": released},
                                          self._memory_facts):
                        yield
                finally:
                    self.stats["updates"] += 1
                    self.stats["update_seconds"] += time.perf_counter() - started
                    self._release_heap()
        finally:
            self._update_depth.n -= 1
            with self._updates:
                self._updates_waiting -= 1
                self._updates.notify_all()

    def _release_heap(self) -> float | None:
        """Trim the C heap (:func:`~rosa2_dspy.memory.release_free_heap`), counted in :attr:`stats`."""
        started = time.perf_counter()
        released = release_free_heap()
        if released is not None:
            self.stats["heap_trims"] += 1
            self.stats["heap_released_mib"] = round(self.stats["heap_released_mib"] + released, 1)
            self.stats["heap_trim_seconds"] += time.perf_counter() - started
        return None if released is None else round(released, 1)

    def _run(self, batch: list[_Job]) -> None:
        live = [job for job in batch if _start(job)]
        if not live:
            return
        try:  # (no update may land between choosing the weights and generating)
            with self.weights_lock, self.peaks.watch("batch", {"rows": len(live)}, self._memory_facts):
                row_weights = self._weights_for([j.settings.weights for j in live])
                results = self.generate_batch([j.input_ids for j in live], live[0].settings, [j.stop for j in live],
                                              [j.settings.seed for j in live], row_weights)
        except BaseException as exc:  # noqa: BLE001 - a failed batch fails each of its callers, not the worker
            if len(live) > 1:  # retry one by one so that one bad request fails only itself
                for job in live:
                    self._run_single(job)
                return
            _fail(live[0].future, exc)
            return
        self.stats["batches"] += 1
        self.stats["mixed_weights_batches"] += row_weights is not None
        self.stats["requests"] += len(live)
        self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], len(live))
        for job, result in zip(live, results):
            job.complete(result)

    def _run_single(self, job: _Job) -> None:
        try:
            with self.weights_lock:
                self._weights_for([job.settings.weights])
                job.complete(self.generate_batch([job.input_ids], job.settings, [job.stop])[0])
        except BaseException as exc:  # noqa: BLE001
            _fail(job.future, exc)
