"""The engine's LoRA adapter slot: attach, reset, snapshot, restore, save, load, and pinned weights.

Every change of weights bumps ``version``; ``weights_id`` names the weights by content. Pinned weights
(:meth:`AdapterSlotMixin.pin`) are kept by id, so that requests naming them are served with them: by
switching the adapter, or row by row in one batch (:meth:`AdapterSlotMixin._per_row_adapters`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from rosa2_dspy.fsutil import staged_dir


class AdapterSlotMixin:
    """The weights of :class:`~rosa2_dspy.engine.LocalEngine`: their identity, pins and the adapter slot."""

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

    def _weights_for(self, wanted: list[str | None]) -> list[str] | None:
        """Make the weights that each row of a batch asks for servable (``None``: the weights in use).

        Rows that agree: switch the adapter (if needed) and return None. Rows that differ: return each row's
        weights id (the id of the weights in use for a row that named none), for :meth:`_per_row_adapters`."""
        distinct = set(wanted)
        if len(distinct) == 1 or self.peft_model is None:
            ident = next(iter(distinct))
            if ident is not None and self.peft_model is not None:
                self.use_pinned(ident)
            return None
        current = self.weights_id
        return [current if ident is None else ident for ident in wanted]

    def _uniform_context(self) -> contextlib.AbstractContextManager:
        """Around a batch whose rows share the weights in use: the adapter switched off when those are the base
        model's weights (a fresh or reset adapter, B = 0). PEFT would still compute the zero update of every
        LoRA layer, casting activations on the way: a third of a one-row prefill of the 1.5B model (session 9)."""
        if self.peft_model is not None and self.weights_id == self.base_fingerprint:
            return self._adapter_layers_off()
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def _adapter_layers_off(self):
        """The LoRA layers switched off around a forward: PEFT's ``disable_adapter`` without the model status it
        first collects (a walk over every layer that checks each one's adapters and gradients), 5% of a decode
        step with per-row adapters (py-spy of the tuning run, session 10). Nested uses leave the layers as found."""
        layers = self._lora_layer_list()
        if not layers or layers[0].disable_adapters:
            yield
            return
        base = self.peft_model.base_model
        base.disable_adapter_layers()
        try:
            yield
        finally:
            base.enable_adapter_layers()

    def _lora_layer_list(self) -> list:
        """The model's LoRA layers (:func:`lora_layers`), found once per attached adapter (read at every step)."""
        cached = self._lora_layers_cache
        if cached is None or cached[0] is not self.peft_model:
            cached = self._lora_layers_cache = (self.peft_model, list(lora_layers(self.peft_model).values()))
        return cached[1]

    def _row_state(self, ident: str) -> dict[str, torch.Tensor] | None:
        """A row's adapter tensors: the live adapter's, None for the base model, else the pinned ones."""
        if ident == self.weights_id:
            return self.adapter_state()
        return None if ident == self.base_fingerprint else self.pinned_state(ident)

    def _grouped_adapters(self, idents: tuple[str, ...]) -> list[tuple]:
        """Per LoRA layer, (the layer, the adapters of ``idents`` side by side): ``A`` as (in, K*r), ``B * scaling`` as
        (K*r, out), in the dtype of the layer's base weights. PEFT computes a LoRA update in the adapter's dtype
        (float32) and casts the activations to it; in a bf16 model that made the per-row updates 23% of a decode
        step with 20 adapters in a batch of 24 (py-spy of the tuning run, session 10), and in float32 nothing
        changes. Built when the set of adapters in the batch changes (a row with other weights joins or leaves),
        reused by every step in between; ids name immutable weights. The list also saves walking the model's
        modules at every step."""
        from peft.tuners.lora import Linear as LoraLinear

        cached = self._grouped_cache
        if cached is not None and cached[0] == idents:
            return cached[1]
        self._grouped_cache = None  # free the old tensors before building the new ones
        states = [self._row_state(ident) for ident in idents]
        grouped = []
        for name, layer in lora_layers(self.peft_model).items():
            if type(layer) is not LoraLinear:
                raise NotImplementedError(f"per-row adapters serve LoRA Linear layers only, not {name}")
            a0, b0 = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            dtype = layer.get_base_layer().weight.dtype
            a = torch.cat([a0.new_zeros(a0.shape) if st is None else st[f"{name}.lora_A.default.weight"]
                           for st in states], dim=0)  # (K*r, in)
            b = torch.cat([b0.new_zeros(b0.shape) if st is None else st[f"{name}.lora_B.default.weight"]
                           for st in states], dim=1) * float(layer.scaling["default"])  # (out, K*r)
            grouped.append((layer, a.t().to(dtype).contiguous(), b.t().to(dtype).contiguous()))
        self._grouped_cache = (idents, grouped)
        return grouped

    @contextlib.contextmanager
    def _per_row_adapters(self, row_idents: list[str]):
        """Serve each row of a batch with its own LoRA weights (``row_idents``: each row's weights id).

        The adapter layers are switched off and a forward hook on each adds the rows' own update: with the
        batch's K adapters side by side (:meth:`_grouped_adapters`), ``((x @ A) * mask) @ B``, where the mask
        keeps each row's own r columns; two matmuls whatever K. (PEFT's ``adapter_names`` loops over the
        adapters in Python in every layer at every step: 2-3x slower for 8 conversations' weights. Stacking a
        copy of each row's adapter at every step, as this did before, took half of a 1.5B model's decode
        step with 20 adapters in a batch of 32.)"""
        distinct = tuple(dict.fromkeys(row_idents))
        grouped = self._grouped_adapters(distinct)
        a_any = grouped[0][1]
        rank = a_any.shape[1] // len(distinct)
        index = torch.tensor([distinct.index(ident) for ident in row_idents])
        mask = (torch.arange(len(distinct) * rank) // rank == index[:, None]).to(a_any.dtype)[:, None, :]  # B,1,Kr
        handles = []
        try:
            for layer, a, b in grouped:
                hook = functools.partial(_add_row_updates, a, b, mask, index, rank)
                handles.append(layer.register_forward_hook(hook))
            with self._adapter_layers_off():
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

    def attach_adapter(self, lora_config=None, seed: int = 0, adapter_dtype: str = "float32"):
        """Wrap the base model with a fresh PEFT LoRA adapter (zero shift); idempotent.

        The A matrices start random (B is zero): drawn from ``seed``, so two runs of one command train
        the same adapter (unseeded, updates differed from run to run), without touching the global RNG.
        ``adapter_dtype``: "float32" (PEFT's default on a 16-bit model) or "model" (the base weights' dtype)."""
        from peft import LoraConfig, get_peft_model

        with self.weights_lock:
            lora_config = lora_config or LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                    target_modules="all-linear", task_type="CAUSAL_LM")
            shape = _adapter_shape(lora_config, adapter_dtype)
            if self.peft_model is not None:
                held = self._held_adapter_shape
                if held is not None and held != shape:  # one engine holds one adapter, shaped when attached
                    raise ValueError(f"this engine's adapter was attached with {held}; this update asks for {shape}: "
                                     "use one adapter (layers, adapter_dtype) per engine")
                return self.peft_model
            self._weights_changing()
            cuda = [torch.device(self.device).index or 0] if str(self.device).startswith("cuda") else []
            with torch.random.fork_rng(devices=cuda):
                torch.manual_seed(seed)  # seeds the CUDA generators too
                self.peft_model = get_peft_model(self.model, lora_config,
                                                 autocast_adapter_dtype=adapter_dtype == "float32")
            self.model = self.peft_model
            self._held_adapter_shape = shape
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
            # the adapter's own tensors: PEFT would otherwise take the whole model's state_dict, which unpacks
            # every prepacked base weight (rosa2_dspy.engine.prepack) only to keep the LoRA keys
            state = {name: t.detach() for name, t in self.adapter_state().items()}
            self.peft_model.save_pretrained(staging, selected_adapters=["default"], state_dict=state)
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


def _adapter_shape(lora_config, adapter_dtype: str) -> dict[str, Any]:
    """The blocks an adapter sits on and its dtype, as two requests for one adapter compare them (an update's
    ``layers`` and ``adapter_dtype`` take effect only when the adapter is attached)."""
    layers = lora_config.layers_to_transform
    return {"layers": sorted(layers) if isinstance(layers, (list, tuple, set)) else layers, "dtype": adapter_dtype}


def lora_layers(peft_model) -> dict[str, Any]:
    """module name -> PEFT LoRA layer that holds the trainable ("default") adapter."""
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in peft_model.named_modules()
            if isinstance(module, LoraLayer) and "default" in module.lora_A}


def _add_row_updates(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, index: torch.Tensor, rank: int, module,
                     args, output: torch.Tensor) -> torch.Tensor:
    """Forward hook: add each row's low-rank update. ``a``: in x K*r and ``b``: K*r x out hold the batch's K
    adapters side by side; ``mask`` (batch x 1 x K*r) keeps each row's own r columns; ``index``: each row's
    adapter; ``rank``: r. A decode step (one position a row) multiplies by every adapter and masks: two matmuls,
    reading each adapter once. A prefill (many positions) takes each row's own adapter out and uses batched matmuls,
    K times fewer multiplications than the masked product, which on a 500-token prompt would cost more than
    the model itself."""
    x = args[0].to(a.dtype)
    if x.shape[-2] == 1:
        delta = ((x @ a) * mask) @ b
    else:
        a_rows = a.view(a.shape[0], -1, rank)[:, index].permute(1, 0, 2)  # (batch, in, r)
        b_rows = b.view(-1, rank, b.shape[1])[index]  # (batch, r, out)
        delta = torch.bmm(torch.bmm(x, a_rows), b_rows)
    return output + delta.to(output.dtype)


def _hash_tensors(items) -> str:
    """A content hash of (name, tensor) pairs, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(items, key=lambda item: item[0]):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()
