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

The package, one job per module (as vLLM splits its engine):

* :mod:`~rosa2_dspy.engine.scheduler`: the request queue, batching worker and usage accounting;
* :mod:`~rosa2_dspy.engine.generation`: batched ``generate`` (sampler, stop strings, padding);
* :mod:`~rosa2_dspy.engine.continuous`: continuous batching, rows joining and leaving a running batch;
* :mod:`~rosa2_dspy.engine.slot`: the LoRA adapter slot, weights ids and pinned weights;
* :mod:`~rosa2_dspy.engine.lm`: DSPy's engine contract and :class:`LocalLM`;
* :mod:`~rosa2_dspy.engine.settings`: the settings and completions passed between them;
* :mod:`~rosa2_dspy.engine.prepack`: the base weights prepacked for oneDNN, for forwards without gradients;

and here :class:`LocalEngine`, assembled from them, with its construction and registry.
"""

from __future__ import annotations

import collections
import queue
import threading
from concurrent.futures import Future

import torch

from rosa2_dspy import models
from rosa2_dspy.engine.continuous import SAMPLE_TOP_K, ContinuousDecoder, Row, sample_token  # noqa: F401
from rosa2_dspy.engine.generation import (  # noqa: F401
    GenerationMixin,
    _contiguous_input,
    _StopOnStrings,
    _TopKSampler,
    left_pad,
)
from rosa2_dspy.engine import prepack as _prepack
from rosa2_dspy.engine.lm import AsyncLocalEngine, EngineContractMixin, LocalLM, _PinHold, request_messages  # noqa: F401
from rosa2_dspy.engine.scheduler import (  # noqa: F401
    EngineStopped, SchedulerMixin, _Job, _share_result, _usage, count_usage, usage_scope,
)
from rosa2_dspy.engine.settings import Completion, GenSettings  # noqa: F401
from rosa2_dspy.engine.slot import AdapterSlotMixin, _add_row_updates, _hash_tensors, lora_layers  # noqa: F401
from rosa2_dspy.memory import PeakWatch

DEFAULT_MAX_TOKENS = 512


class LocalEngine(EngineContractMixin, SchedulerMixin, GenerationMixin, AdapterSlotMixin):
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
                 continuous: bool = False, prepack: bool | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.spec = spec
        self.info = dict(info or {})
        self.base_fingerprint = fingerprint or self._hash_parameters(model)
        self.max_batch = max_batch
        self.continuous = continuous  # serve with continuous batching (rosa2_dspy.engine.continuous)
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
        self.prepacked = False
        self.set_prepack(prepack)
        self._updates = threading.Condition()  # counts the weight changes announced through updating()
        self._updates_waiting = 0
        self._update_depth = threading.local()  # per thread: how deep in updating() (only the outermost counts)
        self.version = 0
        self._pins: dict[str, dict[str, torch.Tensor]] = {}
        # the pin registry has its own lock: holds on pinned weights are taken and released (a conversation
        # starting or ending) without waiting for the generation batch that holds weights_lock
        self._pins_lock = threading.Lock()
        self._pin_counts: collections.Counter[str] = collections.Counter()
        self.peft_model = None
        self._pristine_adapter: dict[str, torch.Tensor] | None = None
        self._held_adapter_shape: dict | None = None  # the attached adapter's blocks and dtype (attach_adapter)
        self._weights_id_cache: tuple[int, str] | None = None
        self._grouped_cache: tuple | None = None  # (weights ids, per layer: the layer, A and B side by side)
        self._lora_layers_cache: tuple | None = None  # (the PEFT model, its LoRA layers)
        self._queue: queue.Queue[_Job] = queue.Queue()
        self._pending: list[_Job] = []
        # greedy requests for pinned weights now queued or generating, by (prompt, settings, stops): an identical
        # one joins the first instead of generating again (every method's turn 1 of a comparison, for one)
        self._inflight: dict[tuple, Future] = {}
        self._remembered = None  # a run's answered greedy requests, while remember_greedy is open
        self._live: set = set()  # jobs queued or generating, whose callers wait (refusing fails them)
        self._refusal: str | None = None  # while refusing() is open: why requests and updates are refused
        self._inflight_lock = threading.Lock()
        self._worker: threading.Thread | None = None
        self._worker_lock = threading.Lock()
        self._worker_idle = threading.Event()  # set while the worker waits for a request (no torch work under way)
        self._decoder = None  # the continuous batching worker's running batch (for the memory record)
        self.peaks = PeakWatch()  # which phase raised the process's memory peak, and what was in memory then
        self.stats = {"batches": 0, "requests": 0, "max_batch_seen": 0, "mixed_weights_batches": 0,
                      "waits_for_updates": 0, "joined": 0,
                      # continuous batching: decode steps, the rows they advanced, their seconds; weight updates
                      "steps": 0, "row_steps": 0, "step_seconds": 0.0, "updates": 0, "update_seconds": 0.0,
                      "remembered": 0,  # greedy requests a run had answered before (remember_greedy)
                      # the free C heap handed back around weight updates (SchedulerMixin.updating)
                      "heap_trims": 0, "heap_released_mib": 0.0, "heap_trim_seconds": 0.0,
                      "peak_set_by": self.peaks.record}

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
               dtype: str | None = None, continuous: bool | None = None, prepack: bool | None = None) -> LocalEngine:
        """One engine per model per process: everything that needs the model borrows this one.

        ``continuous`` picks the serving mode (see :meth:`_serve_continuous`, :meth:`set_batching`); ``prepack``
        (None: leave as it is) the weights forwards without gradients read (:meth:`set_prepack`)."""
        embedded = models.embedded_model(spec)  # 'default' and its name are one model: load it once
        key = (embedded.name if embedded else spec, device or "auto", dtype or "auto")
        with cls._registry_lock:
            if key not in cls._registry:
                cls._registry[key] = cls.from_pretrained(spec, device=device, dtype=dtype, prepack=prepack)
            engine = cls._registry[key]
        if continuous is not None:
            engine.set_batching(continuous)
        if prepack is not None:
            engine.set_prepack(prepack)
        return engine

    def set_prepack(self, on: bool | None = None) -> None:
        """Serve forwards from oneDNN-prepacked base weights (:mod:`~rosa2_dspy.engine.prepack`: the packed copy
        replaces the plain weights inside the blocks), or not. None: the default, on for a bf16 model on a CPU
        (the same outputs and updates bit for bit, 1.3-1.75x per decode step on 2 cores, one more copy of the
        output head only). Asking for it where this build cannot pack the model's weights is a ValueError."""
        wanted = _prepack.default_prepack(self.model) if on is None else bool(on)
        if wanted and (refusal := _prepack.model_refusal(self.model)):
            raise ValueError(f"prepack: {refusal}: run without prepacking")
        with self.weights_lock:
            if wanted:
                self.info["prepacked_linears"] = _prepack.prepack(self.model)
            elif self.prepacked:
                _prepack.unpack(self.model)
                self.info.pop("prepacked_linears", None)
            self.prepacked = wanted

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
