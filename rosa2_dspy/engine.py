"""LocalEngine: one in-process transformers causal LM behind DSPy's engine contract.

DSPy 3.4 calls a custom engine with one canonical ``dspy.lm15.Request`` and expects one
``Response`` (``dspy.LM(model, engine=...)``). The engine here:

* renders the request through the tokenizer's chat template and generates with
  ``max_tokens``, ``temperature``, ``top_p``, ``top_k``, ``stop`` and ``seed``;
* collects requests that arrive concurrently (``dspy.Evaluate(num_threads=...)``,
  ``dspy.Parallel``, DSPy's ``n`` fan-out) for a short window and runs compatible ones as
  one left-padded batched ``generate``; one copy of the weights whatever the thread count;
* owns the LoRA adapter slot: attach, reset, snapshot, restore, save, load. Every change
  of weights bumps ``version``; ``weights_id`` names the weights by content, and
  :class:`LocalLM` puts it in the model string so DSPy's cache key changes with the weights.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import os
import queue
import threading
import time
import uuid
import weakref
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import dspy
import torch
from dspy.lm15 import Message, Request, Response, TextPart, Usage, response_to_events

from rosa2_dspy import models
from rosa2_dspy.decode import SAMPLE_TOP_K
from rosa2_dspy.faults import failpoint
from rosa2_dspy.fsutil import staged_dir

DEFAULT_MAX_TOKENS = 512

_usage = threading.local()


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


@dataclass(frozen=True)
class GenSettings:
    """Settings that must agree for requests to share one batched ``generate`` call."""

    max_tokens: int
    do_sample: bool
    temperature: float
    top_p: float | None
    top_k: int | None
    seed: int | None
    weights: str | None = None  # a pinned weights id (see LocalEngine.pin), else the weights in use

    def batch_key(self) -> GenSettings:
        """What rows of one batch must share: the seed and the weights are per row (each row samples
        from its own generator; rows with different pinned weights run through PEFT's mixed-adapter
        batches)."""
        return replace(self, seed=None, weights=None)


@dataclass(eq=False)  # jobs are compared by identity: identical requests are still distinct jobs
class _Job:
    input_ids: list[int]
    settings: GenSettings
    stop: tuple[str, ...]
    future: Future = field(default_factory=Future)


@dataclass
class Completion:
    """What one request produced: text, token counts and why it ended."""

    text: str
    input_tokens: int
    output_tokens: int
    finish_reason: str
    compute_seconds: float = 0.0  # this row's share of its batch's generate time
    shared: bool = False  # another identical request's generation (no tokens, no time of its own)


class _TopKSampler:
    """Draws the next token from softmax(logits / T) restricted to the top-k tokens and the top-p nucleus
    among them, and returns scores where only that token is finite, so greedy search emits it.

    Equivalent to transformers' top-k -> top-p -> multinomial chain, at a fraction of the cost: it
    never sorts the full vocabulary. Each row with a seed draws from its own generator, so a seeded
    request repeats whatever batch it lands in; rows without one share torch's global generator."""

    def __init__(self, temperature: float, top_p: float | None, top_k: int, seeds: list[int | None]):
        self.temperature = max(float(temperature), 1e-5)
        self.top_p = top_p if top_p is not None and 0 < top_p < 1 else None
        self.top_k = int(top_k)
        self.generators: list[torch.Generator | None] = []
        for seed in seeds:
            generator = None
            if seed is not None:
                generator = torch.Generator()
                generator.manual_seed(int(seed))
            self.generators.append(generator)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        values, indices = torch.topk(scores.float(), min(self.top_k, scores.shape[-1]), dim=-1)
        probs = torch.softmax(values / self.temperature, dim=-1)
        if self.top_p is not None:  # keep the smallest prefix whose mass reaches top_p (the first always)
            cumulative = probs.cumsum(dim=-1)
            probs = probs.masked_fill(cumulative - probs >= self.top_p, 0.0)
        probs = probs.cpu()
        if all(g is None for g in self.generators):
            choice = torch.multinomial(probs, 1)
        else:
            choice = torch.cat([torch.multinomial(probs[row:row + 1], 1, generator=self.generators[row])
                                for row in range(probs.shape[0])])
        choice = choice.to(indices.device)
        chosen = indices.gather(-1, choice)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(-1, chosen, 0.0)


class _StopOnStrings:
    """Per-row stopping on stop strings: each row of a batch has its own stop list."""

    def __init__(self, tokenizer, stops: list[tuple[str, ...]], prompt_len: int):
        self.tokenizer, self.stops, self.prompt_len = tokenizer, stops, prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for row, stop in enumerate(self.stops):
            if stop:
                tail = self.tokenizer.decode(input_ids[row, self.prompt_len:][-32:], skip_special_tokens=True)
                done[row] = any(s in tail for s in stop)
        return done


class LocalEngine:
    """A local causal LM served to DSPy in process, with a LoRA adapter slot.

    Build one with :meth:`from_pretrained` (``"default"`` is the embedded Qwen2.5-Coder-1.5B-Instruct,
    ``"tiny"`` SmolLM2-135M-Instruct) or from a model and tokenizer you already hold; get a ``dspy.LM``
    for it with :meth:`lm`.
    """

    _registry: dict[tuple, LocalEngine] = {}
    _registry_lock = threading.Lock()

    def __init__(self, model, tokenizer, *, name: str = "model", fingerprint: str | None = None,
                 spec: str | None = None, max_batch: int = 32, batch_window: float = 0.02,
                 default_max_tokens: int = DEFAULT_MAX_TOKENS, info: dict | None = None,
                 continuous: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.spec = spec
        self.info = dict(info or {})
        self.base_fingerprint = fingerprint or self._hash_parameters(model)
        self.max_batch = max_batch
        self.continuous = continuous  # serve with continuous batching (rosa2_dspy.decode)
        self.batch_window = batch_window
        self.batch_window_max = 0.25  # a window stays open while requests keep arriving, up to this long
        self.default_max_tokens = default_max_tokens
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.eos_token_ids = self._eos_ids()
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is not None:  # see _contiguous_input
            head.register_forward_pre_hook(_contiguous_input)
        self.device = next(model.parameters()).device
        self.weights_lock = threading.RLock()  # held while generating and while weights change
        self._updates = threading.Condition()  # counts the weight changes announced through updating()
        self._updates_waiting = 0
        self.version = 0
        self._pins: dict[str, dict[str, torch.Tensor]] = {}
        # the pin registry has its own lock: holds on pinned weights are taken and released (a conversation
        # starting or ending) without waiting for the generation batch that holds weights_lock
        self._pins_lock = threading.Lock()
        self._pin_counts: collections.Counter[str] = collections.Counter()
        self.peft_model = None
        self._pristine_adapter: dict[str, torch.Tensor] | None = None
        self._weights_id_cache: tuple[int, str] | None = None
        self._queue: queue.Queue[_Job] = queue.Queue()
        self._pending: list[_Job] = []
        # greedy requests for pinned weights now queued or generating, by (prompt, settings, stops): an identical
        # one joins the first instead of generating again (every method's turn 1 of a comparison, for one)
        self._inflight: dict[tuple, Future] = {}
        self._inflight_lock = threading.Lock()
        self._worker: threading.Thread | None = None
        self._worker_lock = threading.Lock()
        self.stats = {"batches": 0, "requests": 0, "max_batch_seen": 0, "mixed_weights_batches": 0,
                      "waits_for_updates": 0, "joined": 0}

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(cls, spec: str = models.DEFAULT_MODEL, *, device: str | None = None,
                        dtype: str | None = None, **kwargs) -> LocalEngine:
        loaded = models.load_model(spec, device=device, dtype=dtype)
        info = {"source": loaded.source, "device": loaded.device, "dtype": loaded.dtype,
                "load_seconds": round(loaded.load_seconds, 2), **loaded.info}
        return cls(loaded.model, loaded.tokenizer, name=loaded.name, fingerprint=loaded.fingerprint,
                   spec=spec, info=info, **kwargs)

    @classmethod
    def shared(cls, spec: str = models.DEFAULT_MODEL, *, device: str | None = None,
               dtype: str | None = None, continuous: bool | None = None) -> LocalEngine:
        """One engine per model per process: everything that needs the model borrows this one.

        ``continuous`` picks the serving mode (see :meth:`_serve_continuous`) before serving starts."""
        embedded = models.embedded_model(spec)  # 'default' and its name are one model: load it once
        key = (embedded.name if embedded else spec, device or "auto", dtype or "auto")
        with cls._registry_lock:
            if key not in cls._registry:
                cls._registry[key] = cls.from_pretrained(spec, device=device, dtype=dtype)
            engine = cls._registry[key]
        if continuous is not None and continuous != engine.continuous:
            with engine._worker_lock:
                if engine._worker is not None and engine._worker.is_alive():
                    raise ValueError("this engine is already serving in the other batching mode")
                engine.continuous = continuous
        return engine

    def __deepcopy__(self, memo):
        # The engine is a shared resource, like an HTTP client: copies of programs and LMs borrow it.
        return self

    def lm(self, **kwargs) -> LocalLM:
        """A ``dspy.LM`` served by this engine, whose cache key follows the weights."""
        return LocalLM(self, **kwargs)

    # DSPy saves a custom engine as its class path plus this state (dspy.LM.dump_state).
    def dump_state(self) -> dict:
        if self.spec is None:
            raise ValueError("this engine was built from an in-memory model and cannot be saved by reference")
        return {"spec": self.spec}

    @classmethod
    def load_state(cls, state: dict) -> LocalEngine:
        return cls.shared(state["spec"])

    # ------------------------------------------------------------------ the engine contract

    def complete(self, request: Request) -> Response:
        """Generate one completion for a canonical DSPy request."""
        from dspy.clients.engines.base import validate_request

        validate_request(request)
        messages = request_messages(request)
        settings, stop = self._settings(request)
        out = self.generate_one(messages, settings, stop)
        return Response(
            id=f"local-{uuid.uuid4().hex[:12]}", model=request.model,
            message=Message.assistant([TextPart(out.text)]), finish_reason=out.finish_reason,
            usage=Usage(input_tokens=out.input_tokens, output_tokens=out.output_tokens,
                        total_tokens=out.input_tokens + out.output_tokens),
        )

    def stream(self, request: Request):
        return response_to_events(self.complete(request))

    def close(self) -> None:
        """Borrowed by DSPy; the engine lives as long as the process that made it."""

    def _settings(self, request: Request) -> tuple[GenSettings, tuple[str, ...]]:
        config = request.config
        temperature = float(config.temperature or 0.0)
        do_sample = temperature > 0
        settings = GenSettings(
            max_tokens=int(config.max_tokens or self.default_max_tokens),
            do_sample=do_sample,
            temperature=temperature if do_sample else 0.0,
            top_p=config.top_p if do_sample else None,
            top_k=config.top_k if do_sample else None,
            seed=config.seed if do_sample else None,
            weights=self._requested_pin(request.model),
        )
        return settings, tuple(config.stop or ())

    def _requested_pin(self, model: str | None) -> str | None:
        """The pinned weights a request names (``...@<weights_id>`` registered by :meth:`pin`), else None."""
        if not model or "@" not in model:
            return None
        ident = model.rsplit("@", 1)[1]
        return ident if ident in self._pins else None

    # ------------------------------------------------------------------ generation

    def encode_chat(self, messages: list[dict]) -> list[int]:
        encoded = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                     return_dict=True)
        return list(encoded["input_ids"])

    def generate_one(self, messages: list[dict], settings: GenSettings, stop: tuple[str, ...] = ()) -> Completion:
        """Queue one chat for generation and wait for it (batched with concurrent callers)."""
        completion = self.submit(self.encode_chat(messages), settings, stop).result()
        count_usage(completion)
        return completion

    def submit(self, input_ids: list[int], settings: GenSettings, stop: tuple[str, ...] = ()) -> Future:
        """Queue one prompt (token ids); the future gives its :class:`Completion`. Prompts queued
        together (by one caller or by many threads) share batches where their settings allow."""
        # Greedy decoding of pinned weights (ids are content hashes) is a function of the request: an identical
        # request in flight joins it, as DSPy's cache would answer it had the first one finished. Its
        # completion says ``shared`` and counts no tokens or time (the first request's thread counted them).
        key = (tuple(input_ids), settings, tuple(stop)) if not settings.do_sample and settings.weights else None
        with self._inflight_lock:
            first = self._inflight.get(key) if key is not None else None
            if first is not None:
                self.stats["joined"] += 1
                joined: Future = Future()
                first.add_done_callback(lambda done: _share_result(done, joined))
                return joined
            job = _Job(list(input_ids), settings, stop)
            if key is not None:
                self._inflight[key] = job.future
                job.future.add_done_callback(lambda done: self._forget_inflight(key, done))
        self._ensure_worker()
        self._queue.put(job)
        return job.future

    def _forget_inflight(self, key: tuple, future: Future) -> None:
        with self._inflight_lock:
            if self._inflight.get(key) is future:
                del self._inflight[key]

    def generate_batch(self, prompts: list[list[int]], settings: GenSettings,
                       stops: list[tuple[str, ...]] | None = None, seeds: list[int | None] | None = None,
                       row_weights: list[dict[str, torch.Tensor] | None] | None = None) -> list[Completion]:
        """Run prompts (token ids) as one left-padded batch under the same settings, now, in this thread.

        ``seeds`` gives each sampled row its own seed (default: ``settings.seed`` for every row);
        ``row_weights`` gives each row its own adapter tensors (None: the base model), a mixed-weights
        batch (see :meth:`pin`)."""
        stops = stops or [()] * len(prompts)
        seeds = seeds if seeds is not None else [settings.seed] * len(prompts)
        pad = self.tokenizer.pad_token_id
        ids, mask = left_pad(prompts, pad)
        width = ids.shape[1]
        kwargs: dict[str, Any] = dict(max_new_tokens=settings.max_tokens, do_sample=settings.do_sample,
                                      pad_token_id=pad, eos_token_id=self.eos_token_ids)
        # only the last position's logits: a PEFT-wrapped model hides the forward's logits_to_keep from generate,
        # which then projects every prompt position onto the 152k vocabulary (17 s and GBs per 5-row prefill)
        kwargs.update(temperature=None, top_p=None, top_k=None, logits_to_keep=1)
        if settings.do_sample:
            # sampled inside a logits processor over the top-k candidates, then picked "greedily"
            # (transformers' own sampler sorts the whole 49k vocabulary every step: ~13 ms a row here)
            from transformers import LogitsProcessorList

            kwargs["logits_processor"] = LogitsProcessorList([_TopKSampler(
                settings.temperature, settings.top_p, settings.top_k or SAMPLE_TOP_K, seeds)])
        if any(stops):
            from transformers import StoppingCriteriaList

            kwargs["stopping_criteria"] = StoppingCriteriaList([_StopOnStrings(self.tokenizer, stops, width)])
        per_row = self._per_row_adapters(row_weights) if row_weights is not None else contextlib.nullcontext()
        failpoint("generate.batch")
        with self.weights_lock, torch.inference_mode(), per_row:
            was_training = self.model.training
            self.model.eval()
            started = time.perf_counter()
            try:
                out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                          **kwargs)
            finally:
                self.model.train(was_training)
            share = (time.perf_counter() - started) / len(prompts)
        results = []
        for row, prompt in enumerate(prompts):
            new = out[row, width:].tolist()
            finish = "length"
            for i, tok in enumerate(new):
                if tok in self.eos_token_ids:
                    new, finish = new[:i], "stop"
                    break
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            for s in stops[row]:
                cut = text.find(s)
                if cut >= 0:
                    text, finish = text[:cut], "stop"
            results.append(Completion(text, len(prompt), len(new), finish, share))
        return results

    def _ensure_worker(self) -> None:
        with self._worker_lock:
            if self._worker is None or not self._worker.is_alive():
                serve = self._serve_continuous if self.continuous else self._serve
                self._worker = threading.Thread(target=serve, name=f"LocalEngine[{self.name}]", daemon=True)
                self._worker.start()

    def _serve(self) -> None:
        """Collect concurrent requests for a short window (kept open while they keep arriving) and run
        compatible ones together.

        While weight updates are announced (:meth:`updating`), no batch starts: requests keep
        arriving meanwhile, and run together once the updates have landed."""
        while True:
            if not self._pending:
                self._pending.append(self._queue.get())
            opened = time.monotonic()
            deadline = opened + self.batch_window
            while len(self._pending) < self.max_batch * 4:
                remaining = deadline - time.monotonic()
                try:
                    self._pending.append(self._queue.get(timeout=max(remaining, 0)) if remaining > 0
                                         else self._queue.get_nowait())
                except queue.Empty:
                    break
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
        (:class:`~rosa2_dspy.decode.ContinuousDecoder`). Greedy and sampled requests, budgets and stop
        strings mix freely; rows asking for different pinned weights get their own LoRA update per row.

        Weight updates: while one is announced no request joins; the running rows finish under the
        weights they started with, then the updates land, then joining resumes (as a batch in
        :meth:`_serve` finishes before an update)."""
        from rosa2_dspy.decode import ContinuousDecoder, Row

        def fresh() -> ContinuousDecoder:
            return ContinuousDecoder(self.model, self.tokenizer, self.eos_token_ids, self.tokenizer.pad_token_id,
                                     max_rows=self.max_batch, forward_context=self._rows_context)

        decoder = fresh()
        while True:
            if not decoder.rows:
                if not self._pending:
                    self._pending.append(self._queue.get())
                if self._wait_for_updates():
                    continue
            while True:  # whatever else has arrived
                try:
                    self._pending.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            joining = []
            if not self._updates_waiting:
                live = [job for job in self._pending[: decoder.free] if job.future.set_running_or_notify_cancel()]
                self._pending = self._pending[decoder.free:]
                joining = [Row(job.input_ids, job.settings.max_tokens,
                               temperature=job.settings.temperature if job.settings.do_sample else 0.0,
                               top_p=job.settings.top_p, top_k=job.settings.top_k, seed=job.settings.seed,
                               stop=job.stop, tag=job) for job in live]
            if not joining and not decoder.rows:
                continue
            try:
                with self.weights_lock:
                    finished = decoder.step(joining)
            except BaseException as exc:  # noqa: BLE001 - a failed step fails the rows in it, not the worker
                for row in decoder.rows + [r for r in joining if r not in decoder.rows]:
                    if not row.tag.future.done():
                        row.tag.future.set_exception(exc)
                decoder = fresh()
                continue
            self.stats["requests"] += len(finished)
            self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], len(decoder.rows) + len(finished))
            for row in finished:
                row.tag.future.set_result(Completion(decoder.text_of(row), len(row.input_ids), len(row.generated),
                                                     row.finish, row.seconds))

    def _rows_context(self, rows) -> contextlib.AbstractContextManager:
        """The weights each row of a continuous batch asks for, around one forward (see :meth:`_weights_for`)."""
        row_weights = self._weights_for([row.tag.settings.weights for row in rows])
        if row_weights is None:
            return contextlib.nullcontext()
        self.stats["mixed_weights_batches"] += 1
        return self._per_row_adapters(row_weights)

    def _wait_for_updates(self) -> bool:
        """Block while weight updates are announced; True if it waited."""
        with self._updates:
            if not self._updates_waiting:
                return False
            self.stats["waits_for_updates"] += 1
            while self._updates_waiting:
                self._updates.wait()
            return True

    @contextlib.contextmanager
    def updating(self):
        """Hold the weights for a change that goes ahead of queued generation.

        Plain ``weights_lock`` alternates: one update, then a batch of whoever is ready (often one
        row), then the next update. Announced updates instead land back to back while the
        batching worker waits, so generation resumes as one large batch. Re-entrant."""
        with self._updates:
            self._updates_waiting += 1
        try:
            with self.weights_lock:
                self._weights_changing()
                yield
        finally:
            with self._updates:
                self._updates_waiting -= 1
                self._updates.notify_all()

    def _run(self, batch: list[_Job]) -> None:
        live = [job for job in batch if job.future.set_running_or_notify_cancel()]
        if not live:
            return
        try:
            with self.weights_lock:  # no update may land between choosing the weights and generating
                row_weights = self._weights_for([j.settings.weights for j in live])
                results = self.generate_batch([j.input_ids for j in live], live[0].settings, [j.stop for j in live],
                                              [j.settings.seed for j in live], row_weights)
        except BaseException as exc:  # noqa: BLE001 - a failed batch fails each of its callers, not the worker
            if len(live) > 1:  # retry one by one so that one bad request fails only itself
                for job in live:
                    self._run_single(job)
                return
            live[0].future.set_exception(exc)
            return
        self.stats["batches"] += 1
        self.stats["mixed_weights_batches"] += row_weights is not None
        self.stats["requests"] += len(live)
        self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], len(live))
        for job, result in zip(live, results):
            job.future.set_result(result)

    def _run_single(self, job: _Job) -> None:
        try:
            with self.weights_lock:
                self._weights_for([job.settings.weights])
                job.future.set_result(self.generate_batch([job.input_ids], job.settings, [job.stop])[0])
        except BaseException as exc:  # noqa: BLE001
            job.future.set_exception(exc)

    def _eos_ids(self) -> list[int]:
        ids = set()
        for tid in (self.tokenizer.eos_token_id, getattr(self.model.generation_config, "eos_token_id", None)):
            if isinstance(tid, int):
                ids.add(tid)
            elif isinstance(tid, (list, tuple)):
                ids.update(tid)
        im_end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int) and im_end != self.tokenizer.unk_token_id:
            ids.add(im_end)
        return sorted(ids)

    # ------------------------------------------------------------------ weights identity

    @staticmethod
    def _hash_parameters(model) -> str:
        return _hash_tensors(model.state_dict().items())[:16]

    @property
    def weights_id(self) -> str:
        """Content-derived name of the weights now in use: base fingerprint, plus the adapter's hash.

        A valid cached id is read without the lock (a batch in progress holds it for minutes, and
        every unpinned LM reads this id to name its requests); whatever changes the weights drops
        the cached id first, so a reader during a change waits for the lock and the new id."""
        cached = self._weights_id_cache
        if cached is not None and cached[0] == self.version:
            return cached[1]
        with self.weights_lock:
            if self._weights_id_cache and self._weights_id_cache[0] == self.version:
                return self._weights_id_cache[1]
            ident = self.base_fingerprint
            state = self.adapter_state()
            if state and any(t.abs().sum() > 0 for k, t in state.items() if "lora_B" in k):
                ident = f"{ident}-{_hash_tensors(state.items())[:12]}"
            self._weights_id_cache = (self.version, ident)
            return ident

    def pin(self, ident: str | None = None) -> str:
        """Remember the weights now in use under their id, so an LM pinned to it keeps them
        (``ident``: take one more hold on weights pinned earlier). Returns the id.

        The adapter is changed in place, so two programs (say, BetterTogether's candidates before
        and after a weights step, or eight conversations adapting at once) share one engine. A
        pinned ``LocalLM`` names its weights id in every request. A batch whose rows all name one
        id runs after switching the adapter to it (a copy of the small LoRA tensors); a batch whose
        rows name different ids runs as one batch, each row with its own low-rank update
        (:meth:`_per_row_adapters`). Holds are counted; :meth:`unpin` releases one.
        """
        if ident is None:  # the weights in use, read while no update can change them
            with self.weights_lock, self._pins_lock:  # (always in this order)
                ident = self.weights_id
                if ident not in self._pins:
                    self._pins[ident] = self.snapshot()
                self._pin_counts[ident] += 1
                return ident
        with self._pins_lock:
            if ident not in self._pins:
                raise ValueError(f"weights {ident} were never pinned on this engine")
            self._pin_counts[ident] += 1
            return ident

    def unpin(self, ident: str) -> None:
        """Release one hold on pinned weights; the last release forgets them."""
        with self._pins_lock:
            if self._pin_counts[ident] <= 1:
                self._pins.pop(ident, None)
                self._pin_counts.pop(ident, None)
            else:
                self._pin_counts[ident] -= 1

    def pin_holds(self) -> dict[str, int]:
        """Pinned weights ids and how many holds each has (a leak shows up here)."""
        with self._pins_lock:
            return {ident: self._pin_counts[ident] for ident in self._pins}

    def pinned_state(self, ident: str) -> dict[str, torch.Tensor]:
        """The adapter tensors of pinned weights (the zero-shift adapter for weights pinned before one)."""
        with self._pins_lock:
            if ident not in self._pins:
                raise ValueError(f"weights {ident} were never pinned on this engine")
            return self._pins[ident] or dict(self._pristine_adapter or {})

    def use_pinned(self, ident: str) -> None:
        """Switch the adapter to the pinned weights ``ident`` (no-op when already in use)."""
        with self.weights_lock:
            if ident != self.weights_id:
                self.restore(self.pinned_state(ident))

    def _weights_for(self, wanted: list[str | None]) -> list[dict[str, torch.Tensor] | None] | None:
        """Make the weights that each row of a batch asks for servable (``None``: the weights in use).

        Rows that agree: switch the adapter (if needed) and return None. Rows that differ: return
        each row's adapter tensors (the live adapter, pinned tensors, or None for the base model)."""
        distinct = set(wanted)
        if len(distinct) == 1 or self.peft_model is None:
            ident = next(iter(distinct))
            if ident is not None and self.peft_model is not None:
                self.use_pinned(ident)
            return None
        current, live = self.weights_id, self.adapter_state()
        return [live if ident is None or ident == current else
                None if ident == self.base_fingerprint else self.pinned_state(ident) for ident in wanted]

    @contextlib.contextmanager
    def _per_row_adapters(self, row_weights: list[dict[str, torch.Tensor] | None]):
        """Serve each row of a batch with its own LoRA weights.

        The adapter layers are switched off and a forward hook on each adds the rows' own update,
        ``x @ A_row.T @ B_row.T * scaling``, as two batched matmuls over the whole batch. (PEFT's
        ``adapter_names`` loops over the adapters in Python in every layer at every step, which made
        a batch of 8 conversations' weights 2-3x slower than the same batch on one adapter here.)"""
        from peft.tuners.lora import Linear as LoraLinear

        distinct: dict[int, int] = {}
        states: list[dict[str, torch.Tensor] | None] = []
        for state in row_weights:
            if id(state) not in distinct:
                distinct[id(state)] = len(states)
                states.append(state)
        rows = torch.tensor([distinct[id(state)] for state in row_weights])
        handles = []
        try:
            for name, layer in lora_layers(self.peft_model).items():
                if type(layer) is not LoraLinear:
                    raise NotImplementedError(f"per-row adapters serve LoRA Linear layers only, not {name}")
                a0, b0 = layer.lora_A["default"].weight, layer.lora_B["default"].weight
                a = torch.stack([a0.new_zeros(a0.shape) if st is None else st[f"{name}.lora_A.default.weight"]
                                 for st in states])  # (adapters, r, in)
                b = torch.stack([b0.new_zeros(b0.shape) if st is None else st[f"{name}.lora_B.default.weight"]
                                 for st in states]) * float(layer.scaling["default"])  # (adapters, out, r)
                handles.append(layer.register_forward_hook(functools.partial(
                    _add_row_updates, a[rows].transpose(1, 2).contiguous(), b[rows].transpose(1, 2).contiguous())))
            with self.peft_model.disable_adapter():
                yield
        finally:
            for handle in handles:
                handle.remove()

    def _weights_changing(self) -> None:
        """Called under ``weights_lock`` before the weights change: drops the cached id, so that the
        lock-free read in :attr:`weights_id` cannot return it while the change is under way."""
        self._weights_id_cache = None

    def mark_changed(self) -> None:
        """Record that weights changed (called by anything that updates the adapter)."""
        with self.weights_lock:
            self.version += 1

    # ------------------------------------------------------------------ the adapter slot

    @property
    def has_adapter(self) -> bool:
        return self.peft_model is not None

    def attach_adapter(self, lora_config=None, seed: int = 0):
        """Wrap the base model with a fresh PEFT LoRA adapter (zero shift); idempotent.

        The A matrices start random (B is zero): drawn from ``seed``, so two runs of one command train
        the same adapter (unseeded, updates differed from run to run), without touching the global RNG."""
        from peft import LoraConfig, get_peft_model

        with self.weights_lock:
            if self.peft_model is not None:
                return self.peft_model
            lora_config = lora_config or LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                    target_modules="all-linear", task_type="CAUSAL_LM")
            self._weights_changing()
            cuda = [torch.device(self.device).index or 0] if str(self.device).startswith("cuda") else []
            with torch.random.fork_rng(devices=cuda):
                torch.manual_seed(seed)  # seeds the CUDA generators too
                self.peft_model = get_peft_model(self.model, lora_config)
            self.model = self.peft_model
            self._pristine_adapter = self.snapshot()
            self.mark_changed()
            return self.peft_model

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The adapter's trainable tensors (live references), empty when no adapter is attached."""
        if self.peft_model is None:
            return {}
        return {name: param for name, param in self.peft_model.named_parameters()
                if "lora_" in name and "default" in name.split(".")}

    def snapshot(self) -> dict[str, torch.Tensor]:
        """A detached copy of the adapter tensors, for :meth:`restore`."""
        with self.weights_lock:
            return {name: t.detach().clone() for name, t in self.adapter_state().items()}

    def restore(self, snapshot: dict[str, torch.Tensor]) -> None:
        """Put the adapter back exactly as it was in ``snapshot`` (bit-identical)."""
        with self.weights_lock, torch.no_grad():
            state = self.adapter_state()
            if set(state) != set(snapshot):
                raise ValueError("snapshot does not match the attached adapter's tensors")
            self._weights_changing()
            for name, tensor in state.items():
                tensor.copy_(snapshot[name])
            self.mark_changed()

    def reset_adapter(self) -> None:
        """Back to the freshly attached adapter: zero weight shift."""
        if self._pristine_adapter is not None:
            self.restore(self._pristine_adapter)

    def save_adapter(self, path: str | os.PathLike) -> Path:
        """Save the adapter in PEFT's format (safetensors), atomically: staged, then renamed."""
        if self.peft_model is None:
            raise ValueError("no adapter is attached; nothing to save")
        target = Path(path)
        with staged_dir(target) as staging, self.weights_lock:
            self.peft_model.save_pretrained(staging, selected_adapters=["default"])
        return target

    def load_adapter(self, path: str | os.PathLike) -> None:
        """Load adapter weights saved by :meth:`save_adapter` into the slot."""
        from peft import LoraConfig
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        path = Path(path)
        weights = path / "adapter_model.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"no adapter at {path} (expected adapter_model.safetensors)")
        with self.weights_lock:
            if self.peft_model is None:
                self.attach_adapter(LoraConfig.from_pretrained(str(path)))
            self._weights_changing()
            result = set_peft_model_state_dict(self.peft_model, load_file(str(weights)))
            if getattr(result, "unexpected_keys", None):
                raise ValueError(f"adapter at {path} does not fit this model: {result.unexpected_keys[:3]}")
            self.mark_changed()

    @contextlib.contextmanager
    def adapter_disabled(self):
        """Run with the adapter switched off (the base model), e.g. as a reference policy."""
        with self.weights_lock:
            if self.peft_model is None:
                yield self.model
                return
            with self.peft_model.disable_adapter():
                yield self.peft_model


def _load_malloc_trim():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return None


_malloc_trim = _load_malloc_trim()


def release_free_memory() -> None:
    """Hand memory that is free inside glibc's heaps back to the OS.

    Each thread that runs a forward/backward pass gets its own malloc arena, and glibc keeps the
    freed temporaries there: eight conversations updating from eight threads held 15 GB of RSS,
    1.9 GB after one ``malloc_trim`` (BENCHMARKS.md). Cheap (well under a millisecond here)."""
    if _malloc_trim is not None:
        _malloc_trim(0)


def _contiguous_input(module, args):
    """The output head gets a contiguous input. generate hands it the last position's hidden states, a
    strided slice; once PEFT has frozen the head's weight, ``matmul`` no longer folds that 3D slice into one
    matrix product but runs a batched one over a copy of the 152k x 1536 weight per row: a 5-row prefill of
    the 1.5B model took 19.6 s instead of 2.3 s (BENCHMARKS.md)."""
    return (args[0].contiguous(), *args[1:])


def _share_result(first: Future, joined: Future) -> None:
    """Complete a joined request with its first request's outcome (a completion of its own, marked shared)."""
    exc = first.exception()
    if exc is not None:
        joined.set_exception(exc)
        return
    done = first.result()
    joined.set_result(replace(done, input_tokens=0, output_tokens=0, compute_seconds=0.0, shared=True))


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists to a left-padded id tensor and its attention mask (decoder-only batching)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    return ids, mask


def lora_layers(peft_model) -> dict[str, Any]:
    """module name -> PEFT LoRA layer that holds the trainable ("default") adapter."""
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in peft_model.named_modules()
            if isinstance(module, LoraLayer) and "default" in module.lora_A}


def _add_row_updates(a_rows: torch.Tensor, b_rows: torch.Tensor, module, args, output: torch.Tensor) -> torch.Tensor:
    """Forward hook: add each row's low-rank update (a_rows: batch x in x r, b_rows: batch x r x out)."""
    x = args[0]
    return output + torch.bmm(torch.bmm(x.to(a_rows.dtype), a_rows), b_rows).to(output.dtype)


def _hash_tensors(items) -> str:
    """A content hash of (name, tensor) pairs, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(items, key=lambda item: item[0]):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def request_messages(request: Request) -> list[dict]:
    """Canonical request to chat-template messages (text parts only)."""
    messages = []
    if request.system is not None:
        system = request.system if isinstance(request.system, str) else "".join(p.text for p in request.system)
        messages.append({"role": "system", "content": system})
    for message in request.messages:
        role = "system" if message.role == "developer" else message.role
        text = "\n".join(getattr(p, "text", "") for p in message.parts if getattr(p, "text", None) is not None)
        messages.append({"role": role, "content": text})
    return messages


class AsyncLocalEngine:
    """The async counterpart DSPy asks for (``acall``): the same engine, awaited off the event loop."""

    def __init__(self, engine: LocalEngine):
        self.engine = engine

    async def complete(self, request: Request) -> Response:
        import asyncio

        return await asyncio.to_thread(self.engine.complete, request)

    async def stream(self, request: Request):
        for event in response_to_events(await self.complete(request)):
            yield event

    async def aclose(self) -> None:
        """Borrowed, like the sync engine."""


class _PinHold:
    """One hold on pinned weights, released once: by its owner, or when the owner is garbage collected."""

    def __init__(self, owner, engine: LocalEngine, ident: str):
        self._finalizer = weakref.finalize(owner, engine.unpin, ident)

    def release(self) -> None:
        self._finalizer()  # runs at most once


class LocalLM(dspy.LM):
    """``dspy.LM("local/<name>", engine=LocalEngine)`` whose model string carries the weights id.

    DSPy keys its response cache on the request, which includes the model string; putting
    ``@<weights_id>`` there means a cached answer is only ever returned for the same weights.

    By default the LM follows the engine's weights as they change. ``pinned=True`` (or a model
    string naming weights registered with :meth:`LocalEngine.pin`, which is what a finetune
    returns) fixes it to the weights of that moment: the engine switches back to them for its
    requests, so a program compiled with an adapter keeps answering with that adapter.

    A pinned LM holds its own hold on those weights (copies take theirs): :meth:`close` (or
    ``with``) releases it, and so does the garbage collector, when nobody closed it.
    """

    def __init__(self, engine: LocalEngine, *, pinned: bool = False, **kwargs):
        kwargs.setdefault("num_retries", 0)
        kwargs.setdefault("max_tokens", engine.default_max_tokens)
        self._local_engine = engine
        self._pin: str | None = None
        self._hold: _PinHold | None = None
        super().__init__(f"local/{engine.name}", engine=engine, async_engine=AsyncLocalEngine(engine), **kwargs)
        if pinned:
            self._pin = engine.pin()
            self._hold = _PinHold(self, engine, self._pin)

    def _hold_pin(self, ident: str | None) -> None:
        """Name ``ident`` (pinned weights, or None: follow the engine), taking a hold on it first."""
        engine = getattr(self, "_local_engine", None)
        old = getattr(self, "_hold", None)
        self._pin, self._hold = None, None
        if engine is not None and ident is not None:
            try:
                engine.pin(ident)
            except ValueError:  # not (or no longer) pinned on this engine: follow the engine's weights
                pass
            else:
                self._pin, self._hold = ident, _PinHold(self, engine, ident)
        if old is not None:
            old.release()

    @property
    def model(self) -> str:
        return f"{self._model_base}@{self._pin or self._local_engine.weights_id}"

    @model.setter
    def model(self, value: str) -> None:
        base, _, ident = value.partition("@")
        self._model_base = base
        self._hold_pin(ident or None)

    @property
    def pinned_weights(self) -> str | None:
        return self._pin

    def close(self) -> None:
        """Release this LM's hold on its pinned weights (idempotent; it follows the engine's weights after),
        and what ``dspy.LM.close`` releases."""
        self._hold_pin(None)
        super().close()

    def __enter__(self) -> LocalLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __copy__(self):  # LM.copy
        copied = super().__copy__()
        copied._hold = None  # the original's hold stays the original's
        copied._hold_pin(self._pin)
        return copied

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_hold", None)
        return state

    def __setstate__(self, state):  # copy.deepcopy (Module.deepcopy) comes through here
        super().__setstate__(state)
        self._hold = None
        self._hold_pin(state.get("_pin"))

    def __call__(self, prompt=None, *, messages=None, **kwargs):
        """As ``dspy.LM.__call__``; sampled ``n > 1`` candidates are requested concurrently, so the
        engine runs them as one batch (DSPy itself asks a custom engine for them one after another).
        Each candidate is its own rollout (``rollout_id`` base*n+i), so the cache keeps them apart."""
        n = kwargs.get("n", self.kwargs.get("n", 1)) or 1
        temperature = kwargs.get("temperature", self.kwargs.get("temperature")) or 0.0
        if n <= 1 or temperature <= 0:
            return super().__call__(prompt, messages=messages, **kwargs)
        import contextvars
        from concurrent.futures import ThreadPoolExecutor

        base = kwargs.pop("rollout_id", None) or 0
        call = super().__call__
        with ThreadPoolExecutor(max_workers=n, thread_name_prefix="rosa2-candidates") as pool:
            futures = [pool.submit(contextvars.copy_context().run, call, prompt, messages=messages,
                                   **{**kwargs, "n": 1, "rollout_id": base * n + i}) for i in range(n)]
            outputs = []
            for future in futures:
                outputs.extend(future.result())
        return outputs

    @property
    def engine_ref(self) -> LocalEngine:
        return self._local_engine
