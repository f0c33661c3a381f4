"""DSPy's side of the engine: the engine contract (``complete``/``stream`` on canonical requests), its
async counterpart, and :class:`LocalLM`, the ``dspy.LM`` whose model string carries the weights id.

DSPy 3.4 calls a custom engine with one canonical ``dspy.lm15.Request`` and expects one
``Response`` (``dspy.LM(model, engine=...)``).
"""

from __future__ import annotations

import uuid
import weakref
from typing import TYPE_CHECKING

import dspy
from dspy.lm15 import Message, Request, Response, TextPart, Usage, response_to_events

from rosa2_dspy.engine.settings import GenSettings

if TYPE_CHECKING:
    from rosa2_dspy.engine import LocalEngine


class EngineContractMixin:
    """What DSPy calls on :class:`~rosa2_dspy.engine.LocalEngine`: one completion per canonical request."""

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
