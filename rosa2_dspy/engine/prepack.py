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
blocked weight; ``tests/test_engine.py`` checks a model's logits and greedy replies), so switching it on
changes no output, only the time: 1.4-1.7x per decode step on this project's 2-core box (BENCHMARKS.md,
session 14). The cost is a second copy of the base weights (3.1 GB for the 1.5B default in bf16). In float32
the packed product rounds differently from the plain one and the copy would be 7 GB, so the engine packs only
bf16 models by default; ``LocalEngine(prepack=True)`` asks for it in float32 too.

The LoRA factors are not packed (they change at every update); nor is a weight that changed after it was packed
(its in-place version or storage moved on): such a forward falls back to the plain weight.
"""

from __future__ import annotations

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


def default_for(device: str, dtype) -> bool:
    """On by default where it changes no output and costs one bf16 copy: a bf16 model on a CPU that runs bf16."""
    return dtype == torch.bfloat16 and supported(device, dtype)


def _device_dtype(model) -> tuple[str, torch.dtype | None]:
    param = next(model.parameters(), None)
    return ("none", None) if param is None else (param.device.type, param.dtype)


def can_prepack(model) -> bool:
    return supported(*_device_dtype(model))


def default_prepack(model) -> bool:
    return default_for(*_device_dtype(model))


class _Packed:
    """A base linear's forward: the packed weight without autograd, the module's own weight otherwise."""

    __slots__ = ("module", "packed", "version", "pointer", "dtype")

    def __init__(self, module: torch.nn.Linear):
        weight = module.weight
        self.module = module
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
        self.version, self.pointer, self.dtype = weight._version, weight.data_ptr(), weight.dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        module = self.module
        weight = module.weight
        if (torch.is_grad_enabled() or x.dtype != self.dtype or x.device.type != "cpu"
                or weight._version != self.version or weight.data_ptr() != self.pointer):
            return F.linear(x, weight, module.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, module.bias, "none", [], "")


def base_linears(model) -> list[torch.nn.Linear]:
    """The model's own ``nn.Linear`` layers: every projection and the output head, not LoRA factors."""
    return [module for name, module in model.named_modules()
            if type(module) is torch.nn.Linear and ".lora_" not in f".{name}"]


def prepack(model) -> int:
    """Pack every base linear of ``model`` (idempotent); returns how many are packed."""
    count = 0
    for module in base_linears(model):
        if not isinstance(module.__dict__.get("forward"), _Packed):
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
