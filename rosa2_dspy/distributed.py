"""Past one machine: a run's conversations (or problems) sharded over Ray actors (``--ray``).

Each actor holds one engine (the model on its own CPU cores or GPU), the program, and the run's solver: the
same :func:`~rosa2_dspy.experiments.comparison_solver` or :func:`~rosa2_dspy.experiments.evaluation_solver` a
local run uses, rebuilt in the actor from a :class:`Workload` (values that pickle: the model and program as the
run folder's identity names them). The driver keeps the run folder: :class:`RayWorkers` hands items to actors
with a free slot (``threads`` in flight on each, so each engine batches its own) and resolves one future per
item, which :func:`~rosa2_dspy.evaluation.run_items` turns into the run's ``results.jsonl`` lines, resume and
report exactly as locally.

A lost actor (its process or its node died): the items it had in flight go back to the front of the queue and
run on the other actors, and a fresh actor is started in its place while ``replacements`` last (Ray places it
wherever resources are free). Only the driver writes results, one line per item, so nothing is duplicated;
if the driver itself dies, rerunning the command resumes like any run.

Ray's own ``ActorPool`` keeps one task per actor and leaves a dead actor's tasks to the caller; a conversation
pool needs many in flight per actor (the engine batches them) and reruns on loss, hence this small dispatcher.
"""

from __future__ import annotations

import collections
import contextlib
import math
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any


class RayError(RuntimeError):
    """Ray is missing, or the actors could not start or all died; the message says what to do."""


@dataclass(frozen=True)
class Workload:
    """What each actor builds: the model as a run's identity names it (``device`` and ``dtype`` resolved by
    the driver, so every actor computes in the same precision), the program file (absolute) and its keyword
    arguments, a compiled artifact to load (words and adapter), and the solver: ``"comparison"`` with
    ``methods``, ``user``, ``session``, ``update`` in ``options``, or ``"evaluation"`` with ``max_tokens``,
    ``temperature``, ``cache``."""

    model: str
    program: str
    solver: str
    device: str | None = None
    dtype: str | None = None
    batching: str | None = "continuous"
    prepack: bool | None = None  # None: the engine's default (LocalEngine.set_prepack)
    program_kwargs: dict = field(default_factory=dict)
    compiled: str | None = None
    options: dict = field(default_factory=dict)


class _Actor:
    """The body of one Ray actor: an engine, the program and the run's solver, built once."""

    def __init__(self, workload: Workload, cpus: float):
        import torch

        from rosa2_dspy import experiments
        from rosa2_dspy.engine import LocalEngine
        from rosa2_dspy.program_loader import load_program

        experiments.quiet_libraries()
        torch.set_num_threads(max(1, int(cpus)))  # the cores Ray reserved for this actor
        self.engine = LocalEngine.shared(workload.model, device=workload.device, dtype=workload.dtype,
                                         continuous=None if workload.batching is None
                                         else workload.batching == "continuous", prepack=workload.prepack)
        program = load_program(workload.program, **workload.program_kwargs)
        if workload.compiled:
            from rosa2_dspy.artifacts import load_compiled

            load_compiled(workload.compiled, program, self.engine)
        solver = {"comparison": experiments.comparison_solver,
                  "evaluation": experiments.evaluation_solver}[workload.solver]
        self._stack = contextlib.ExitStack()
        self._solve = self._stack.enter_context(solver(program, self.engine, **workload.options))

    def facts(self) -> dict:
        from rosa2_dspy.experiments import engine_facts

        return engine_facts(self.engine)

    def solve(self, item) -> dict:
        from rosa2_dspy.evaluation import solve_guarded

        return solve_guarded(self._solve, item)  # as a local run records an error


class _Slot:
    """One actor: its handle, whether it is serving, and the items it has in flight."""

    def __init__(self, handle, ready=None, started: float = 0.0):
        self.handle, self.alive = handle, True
        self.ready, self.started = ready, started  # a replacement: its facts() call, until it resolves
        self.inflight: dict[Any, tuple[Any, Future]] = {}  # ObjectRef -> (item, its future)


class RayWorkers:
    """``actors`` Ray actors running ``workload``; ``submit(item)`` returns a future of the item's record.

    ``address``: a running cluster (``auto``, ``ray://host:10001``, ``host:6379``), or None for a new local Ray
    instance. ``threads``: items in flight per actor. ``cpus``/``gpus``: what each actor reserves (``gpus``
    defaults to 1 when the workload runs on CUDA); a cluster without room for every actor is refused at once.
    ``replacements``: fresh actors started, in all, in place of lost ones. ``start_timeout``: seconds an actor
    may take to load its model before the run gives up on it. Use as a context manager (``run_items`` does):
    leaving it stops the actors."""

    def __init__(self, workload: Workload, *, address: str | None = None, actors: int = 2, threads: int = 16,
                 cpus: float = 1, gpus: float | None = None, replacements: int | None = None,
                 start_timeout: float = 1800):
        try:
            import ray
        except ImportError:
            raise RayError("--ray needs Ray: pip install 'rosa2-dspy[ray]' (or pip install ray)") from None
        if actors < 1 or threads < 1:
            raise RayError("a Ray run needs at least one actor and one thread per actor")
        self._ray, self.workload, self.threads, self.cpus = ray, workload, threads, cpus
        gpus = (1 if (workload.device or "").startswith("cuda") else 0) if gpus is None else gpus
        if not ray.is_initialized():
            try:  # "local": a new instance here, even where RAY_ADDRESS or `ray start` names a cluster
                ray.init(address=address or "local", include_dashboard=False, log_to_driver=True,
                         **({"num_cpus": max(math.ceil(cpus * actors), 1)} if address is None else {}))
            except Exception as exc:  # noqa: BLE001 - an unreachable address, a bad one: one line
                raise RayError(f"cannot start or reach Ray at {address or 'a local instance'}: {exc}") from None
        have = ray.cluster_resources()
        for name, each in (("CPU", cpus), ("GPU", gpus)):
            if each and have.get(name, 0) < each * actors:
                raise RayError(f"{actors} actors x {each} {name} need {each * actors:g}, the Ray cluster has "
                               f"{have.get(name, 0):g}: use fewer --ray-actors or --ray-cpus")
        self._actor_class = ray.remote(_Actor).options(num_cpus=cpus, num_gpus=gpus, max_concurrency=threads,
                                                       max_restarts=0)
        self.replacements = actors if replacements is None else replacements
        self.start_timeout = start_timeout
        self.stats = collections.Counter()
        self._queue: collections.deque = collections.deque()
        self._wake = threading.Condition()
        self._closed = False
        self._lost_because = ""
        self._slots = [_Slot(self._actor_class.remote(workload, cpus)) for _ in range(actors)]
        try:  # an actor that cannot build its engine or program says so now, not item by item
            self._facts = ray.get([slot.handle.facts.remote() for slot in self._slots], timeout=start_timeout)
        except ray.exceptions.GetTimeoutError:
            self._kill_all()
            raise RayError(f"the Ray actors did not start within {start_timeout:g} s (placed nowhere, or loading "
                           "the model takes longer)") from None
        except ray.exceptions.RayError as exc:
            self._kill_all()
            raise RayError(f"a Ray actor could not start: {_cause(exc)}") from None
        except BaseException:
            self._kill_all()
            raise
        self._final_stats: dict | None = None
        self._loop = threading.Thread(target=self._dispatch, name="rosa2-ray-dispatch", daemon=True)
        self._loop.start()

    # -- the interface run_items uses ------------------------------------------------------

    def submit(self, item) -> Future:
        future: Future = Future()
        with self._wake:
            if self._closed:
                raise RayError("these Ray workers are closed")
            self._queue.append((item, future, False))
            self._wake.notify()
        return future

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(interrupted=exc_type is not None)

    def close(self, interrupted: bool = False) -> None:
        """Stop dispatching, keep the actors' engine counters (:meth:`engine_facts`; not after an interruption,
        when the actors are still busy), stop the actors. Idempotent."""
        with self._wake:
            if self._closed:
                return
            self._closed = True
            self._fail_all(RayError("the run stopped before this item ran"))
            self._wake.notify()
        try:
            self._loop.join()
            if not interrupted:
                totals: collections.Counter = collections.Counter()
                for slot in self._slots:
                    if slot.alive and slot.ready is None:
                        with contextlib.suppress(Exception):
                            totals.update(self._ray.get(slot.handle.facts.remote(), timeout=60)["engine_batches"])
                self._final_stats = dict(totals)
        finally:
            self._kill_all()

    def engine_facts(self) -> dict:
        """The model, weights, device and dtype the actors ran (from the first), and their engine counters
        summed (after :meth:`close`; before it, the first actor's at start), plus how many actors and losses."""
        facts = dict(self._facts[0])
        if self._final_stats is not None:
            facts["engine_batches"] = self._final_stats
        facts["ray"] = {"actors": len(self._facts), "threads_per_actor": self.threads, **self.stats}
        return facts

    def kill_actor(self, index: int = 0) -> None:
        """Kill one actor as a lost node would (its process ends); its items run elsewhere (tests use it)."""
        self._ray.kill(self._slots[index].handle, no_restart=True)

    # -- the dispatcher ----------------------------------------------------------------------

    def _dispatch(self) -> None:
        try:
            self._dispatch_loop()
        except BaseException as exc:  # noqa: BLE001 - a dead dispatcher must not leave callers waiting forever
            with self._wake:
                self._closed = True
                error = RayError(f"the Ray dispatcher failed: {type(exc).__name__}: {exc}")
                self._fail_all(error)
                for slot in self._slots:
                    for _, future in slot.inflight.values():
                        future.set_exception(error)
                    slot.inflight.clear()

    def _dispatch_loop(self) -> None:
        ray = self._ray
        while True:
            with self._wake:
                if self._closed:  # a run that ends normally has nothing in flight here; an interrupted one stops
                    for slot in self._slots:
                        for _, future in slot.inflight.values():
                            future.set_exception(RayError("the run stopped while this item ran"))
                        slot.inflight.clear()
                    return
                self._admit_replacements()
                self._fill()
                refs = [ref for slot in self._slots for ref in slot.inflight]
                if not refs:
                    self._wake.wait(timeout=0.5)
                    continue
            ready, _ = ray.wait(refs, num_returns=1, timeout=0.5)
            for ref in ready:
                self._finish(ref)

    def _admit_replacements(self) -> None:
        """A replacement serves once its model is loaded; one that failed, or was placed nowhere within
        ``start_timeout``, is given up (called under the lock)."""
        ray = self._ray
        for slot in self._slots:
            if not slot.alive or slot.ready is None:
                continue
            done, _ = ray.wait([slot.ready], timeout=0)
            if done:
                try:
                    ray.get(done[0])
                    slot.ready = None
                except ray.exceptions.RayError as exc:
                    slot.alive, self._lost_because = False, _cause(exc)
            elif time.monotonic() - slot.started > self.start_timeout:
                slot.alive, self._lost_because = False, f"a replacement did not start in {self.start_timeout:g} s"
                with contextlib.suppress(Exception):
                    ray.kill(slot.handle, no_restart=True)

    def _fill(self) -> None:
        """Hand queued items to serving actors with free slots, the least busy first (called under the lock)."""
        live = [slot for slot in self._slots if slot.alive and slot.ready is None]
        starting = any(slot.alive and slot.ready is not None for slot in self._slots)
        if not live:
            if self._queue and not starting:
                self._fail_all(RayError(f"every Ray actor died ({self._lost_because}) and no replacement is left; "
                                        "rerun the same command to resume"))
            return
        while self._queue:
            slot = min(live, key=lambda s: len(s.inflight))
            if len(slot.inflight) >= self.threads:
                return
            item, future, started = self._queue.popleft()
            if started or future.set_running_or_notify_cancel():
                slot.inflight[slot.handle.solve.remote(item)] = (item, future)

    def _finish(self, ref) -> None:
        ray = self._ray
        with self._wake:
            slot = next(s for s in self._slots if ref in s.inflight)
            item, future = slot.inflight.pop(ref)
        try:
            record = ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError, ray.exceptions.NodeDiedError,
                ray.exceptions.WorkerCrashedError) as exc:  # the actor or its node is gone: the item runs elsewhere
            with self._wake:
                if self._closed:
                    future.set_exception(RayError("the run stopped while this item ran"))
                    return
                self.stats["rerun_items"] += 1
                self._queue.appendleft((item, future, True))
                if slot.alive:
                    slot.alive = False
                    self.stats["lost_actors"] += 1
                    self._lost_because = _cause(exc)
                    with contextlib.suppress(Exception):  # it may linger (unreachable, not dead): free its resources
                        ray.kill(slot.handle, no_restart=True)
                    if self.replacements > 0:  # Ray places it where resources are free; it serves once loaded
                        self.replacements -= 1
                        self.stats["started_replacements"] += 1
                        handle = self._actor_class.remote(self.workload, self.cpus)
                        self._slots.append(_Slot(handle, handle.facts.remote(), time.monotonic()))
            return
        except Exception as exc:  # noqa: BLE001 - an item whose record cannot come back is recorded as an error
            from rosa2_dspy.evaluation import error_record

            record = error_record(item, exc)
        future.set_result(record)

    def _fail_all(self, error: Exception) -> None:
        while self._queue:
            _, future, started = self._queue.popleft()
            if started or future.set_running_or_notify_cancel():
                future.set_exception(error)

    def _kill_all(self) -> None:
        for slot in self._slots:
            with contextlib.suppress(Exception):
                self._ray.kill(slot.handle, no_restart=True)
            slot.alive = False


def _cause(exc: BaseException) -> str:
    """The last line of a Ray error's text (the actor's own exception), without Ray's traceback."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1][:500] if lines else type(exc).__name__
