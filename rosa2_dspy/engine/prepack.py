"""oneDNN-prepacked weights for the base model's linear layers, used where no gradient is taken.

A decode step of a 1.5B model on a CPU is a few dozen matrix products of 1-32 rows against weights of tens of
megabytes, so it should run at the speed of reading the weights. PyTorch's plain ``F.linear`` reorders each
weight into oneDNN's blocked layout on every call; at few rows that reorder costs as much as the product. The
engine therefore packs every base linear once (``torch.ops.mkldnn._reorder_linear_weight``, what inductor's
weight freezing does) and serves forwards without autograd (generation under ``inference_mode``, an update's
reference forward under ``no_grad``) from the packed copy through ``torch.ops.mkldnn._linear_pointwise``. A
forward that takes gradients (an update's policy forward and backward, activation checkpointing's recompute)
uses the plain weight as before, so training is untouched.

In bfloat16 the packed product equals the plain one bit for bit (oneDNN runs the same kernel on the same
blocked weight; ``tests/test_prepack.py`` checks a model's logits, greedy replies and an update), so switching it on
changes no output, only the time: 1.3-1.75x per decode step on a 2-core AMD EPYC (BENCHMARKS.md,
session 14). The cost is a second copy of the base weights (3.1 GB for the 1.5B default in bf16). In float32
the packed product rounds differently from the plain one and the copy would be 7 GB, so the engine packs only
bf16 models by default; ``LocalEngine(prepack=True)`` asks for it in float32 too.

The LoRA factors are not packed (they change at every update). A forward falls back to the plain weight where the
packed one would not give the same result: a weight changed after it was packed (:meth:`_Packed.fresh`), an input
that is not contiguous (oneDNN then rounds differently in bf16), autocast, another dtype or device.
"""

from __future__ import annotations

import copy
import weakref

import torch
import torch.nn.functional as F

_PACKABLE = (torch.bfloat16, torch.float32)


def supported(device: str, dtype) -> bool:
    """Whether this PyTorch build packs weights of ``dtype`` on ``device``: bf16 or float32 on a CPU with oneDNN
    (and, for bf16, oneDNN's bf16 kernels)."""
    if not str(device).startswith("cpu") or dtype not in _PACKABLE:
        return False
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    return dtype != torch.bfloat16 or bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def refusal(device: str, dtype) -> str | None:
    """Why weights of ``dtype`` on ``device`` cannot be packed here (the one message the engine and the CLI give),
    or None where they can."""
    if supported(device, dtype):
        return None
    return (f"{str(dtype).removeprefix('torch.')} weights on {device} cannot be prepacked (a CPU model in bf16 or "
            "float32 and a PyTorch with oneDNN, with its bf16 kernels for bf16, can)")


def default_for(device: str, dtype) -> bool:
    """On by default where it changes no output and costs one bf16 copy: a bf16 model on a CPU that runs bf16."""
    return dtype == torch.bfloat16 and supported(device, dtype)


def _device_dtype(model) -> tuple[str, torch.dtype | None]:
    param = next(model.parameters(), None)
    return ("none", None) if param is None else (param.device.type, param.dtype)


def can_prepack(model) -> bool:
    return supported(*_device_dtype(model))


def model_refusal(model) -> str | None:
    """:func:`refusal` for a model's weights."""
    return refusal(*_device_dtype(model))


def default_prepack(model) -> bool:
    return default_for(*_device_dtype(model))


class _Packed:
    """A base linear's forward: the packed weight without autograd, the module's own weight otherwise. It holds
    its module weakly (the module holds it as ``forward``), so a dropped model frees both without waiting for the
    cycle collector. A deep copy or an unpickled copy of the module packs its own weight at its first forward."""

    __slots__ = ("module", "packed", "version", "pointer", "dtype")

    def __init__(self, module: torch.nn.Linear, lazy: bool = False):
        self.module = weakref.ref(module)
        self.packed = None
        if not lazy:
            self._pack(module)

    def _pack(self, module: torch.nn.Linear) -> None:
        weight = module.weight
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
        self.version, self.pointer, self.dtype = weight._version, weight.data_ptr(), weight.dtype

    def fresh(self, module: torch.nn.Linear) -> bool:
        """Whether the packed copy is the module's weight as it is now. An in-place change through the tensor
        (``weight.mul_``, ``copy_``) moves its version, a new tensor its storage; a change through ``.data``
        moves neither and goes unseen (PEFT's ``merge_adapter`` writes so: the engine never merges)."""
        weight = module.weight
        return self.packed is not None and weight._version == self.version and weight.data_ptr() == self.pointer

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        module = self.module()
        if self.packed is None and not torch.is_grad_enabled():
            self._pack(module)
        if (torch.is_grad_enabled() or x.dtype != self.dtype or x.device.type != "cpu" or not x.is_contiguous()
                or torch.is_autocast_enabled("cpu") or not self.fresh(module)):
            return F.linear(x, module.weight, module.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, module.bias, "none", [], "")

    def __deepcopy__(self, memo):  # an opaque oneDNN tensor has no storage to copy: the copy packs its own
        return _Packed(copy.deepcopy(self.module(), memo), lazy=True)

    def __reduce__(self):
        return _lazy_packed, (self.module(),)


def _lazy_packed(module: torch.nn.Linear) -> _Packed:
    return _Packed(module, lazy=True)


def base_linears(model) -> list[torch.nn.Linear]:
    """The model's own ``nn.Linear`` layers: every projection and the output head, not LoRA factors."""
    return [module for name, module in model.named_modules()
            if type(module) is torch.nn.Linear and ".lora_" not in f".{name}"]


def prepack(model) -> int:
    """Pack every base linear of ``model`` (idempotent); returns how many are packed."""
    count = 0
    for module in base_linears(model):
        packed = module.__dict__.get("forward")
        if not (isinstance(packed, _Packed) and packed.fresh(module)):
            module.forward = _Packed(module)
        count += 1
    return count


def unpack(model) -> None:
    """Back to plain ``F.linear`` everywhere; the packed copies are freed."""
    for module in base_linears(model):
        if isinstance(module.__dict__.get("forward"), _Packed):
            del module.forward


def packed_count(model) -> int:
    """How many base linears are served from packed weights now."""
    return sum(isinstance(m.__dict__.get("forward"), _Packed) for m in base_linears(model))
