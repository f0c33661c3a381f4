"""oneDNN-prepacked weights for the base model's linear layers, used where no gradient is taken.

A decode step of a 1.5B model on a CPU is a few dozen matrix products of 1-32 rows against weights of tens of
megabytes, so it should run at the speed of reading the weights. PyTorch's plain ``F.linear`` reorders each
weight into oneDNN's blocked layout on every call; at few rows that reorder costs as much as the product. The
engine therefore packs every base linear once (``torch.ops.mkldnn._reorder_linear_weight``, what inductor's
weight freezing does) and serves forwards without autograd (generation under ``inference_mode``, an update's
reference forward under ``no_grad``) from the packed copy through ``torch.ops.mkldnn._linear_pointwise``.

In bfloat16 the packed product equals the plain one bit for bit (oneDNN runs the same kernel on the same
blocked weight; ``tests/test_prepack.py`` checks a model's logits, greedy replies and an update), so switching it on
changes no output, only the time: 1.3-1.75x per decode step on a 2-core AMD EPYC (BENCHMARKS.md,
session 14). In float32 the packed product rounds differently from the plain one (the same model to about 1e-5;
batched greedy rows still equal their unbatched replies, both packed), and a batch-16 decode step of the default
model is about 2x faster (BENCHMARKS.md, sessions 23 and 30), so the engine packs float32 CPU models by default too,
and a float32 run folder records it in its identity (``rosa2_dspy.cli.common.model_identity``), so that it never
mixes packed and plain answers. ``LocalEngine(prepack=False)`` (``--no-prepack``) serves the plain weights.

The packed copy replaces the plain weight of every projection inside the blocks, so packing costs no memory
there: the module's ``weight`` becomes a :class:`_Placeholder` (its shape and dtype, one element of storage), and
forwards that take gradients run the packed product too (:class:`_PackedLinear`: its backward unpacks the weight
for ``grad @ W``, the product plain ``F.linear`` computes, so an update comes out the same bit for bit). The engine
trains LoRA factors only, never a base weight. The output head keeps its plain weight beside the packed one (the
fused LM head of an update reads it directly: 0.47 GB for the default model), as does a weight tied to another
(SmolLM2's head is its embedding). A deep copy, a pickle or a ``state_dict`` of the model gets the plain weights
back (unpacked), so copies and checkpoints are what they were.

The LoRA factors are not packed (they change at every update). A forward falls back to the plain weight where the
packed one would not give the same result: a weight changed after it was packed (:meth:`_Packed.fresh`), an input
that is not contiguous (oneDNN then rounds differently in bf16), autocast to another dtype, another dtype or
device.
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
    """On by default wherever this build packs (:func:`supported`): a CPU model in bf16 (the same outputs bit for
    bit) or in float32 (rounding of its own, recorded in a run's identity), at the price of one more copy of the
    output head."""
    return supported(device, dtype)


def _device_dtype(model) -> tuple[str, torch.dtype | None]:
    param = next(model.parameters(), None)
    return ("none", None) if param is None else (param.device.type, param.dtype)


def model_refusal(model) -> str | None:
    """:func:`refusal` for a model's weights."""
    return refusal(*_device_dtype(model))


def default_prepack(model) -> bool:
    return default_for(*_device_dtype(model))


class _Placeholder(torch.nn.Parameter):
    """A base weight whose only copy is the packed one: its shape and dtype on one element of storage (writing to
    it fails: every element is the same one). A deep copy or a pickle of it is the plain weight, unpacked."""

    def __new__(cls, weight: torch.Tensor, packed: torch.Tensor):
        # NaN, so that any code that reads it anyway computes NaN, not a plausible number
        data = torch.full((), float("nan"), dtype=weight.dtype, device=weight.device).expand(weight.shape)
        self = torch.Tensor._make_subclass(cls, data, False)
        self.packed = packed
        return self

    def dense(self) -> torch.Tensor:
        return self.packed.to_dense()

    def __deepcopy__(self, memo):
        return torch.nn.Parameter(self.dense(), requires_grad=False)

    def __reduce_ex__(self, protocol):
        return torch.nn.Parameter, (self.dense(), False)


def _dense_state(module, state_dict, prefix, local_metadata) -> None:
    """A ``state_dict`` of a module whose weight is a placeholder holds the weight unpacked."""
    weight = module.__dict__["_parameters"].get("weight")
    if isinstance(weight, _Placeholder):
        state_dict[prefix + "weight"] = weight.dense()


class _PackedLinear(torch.autograd.Function):
    """``x @ W.T + b`` from the packed weight, with a gradient for ``x`` (the weight is frozen): ``grad @ W`` on
    the weight unpacked, the same product as plain ``F.linear``'s backward."""

    @staticmethod
    def forward(ctx, x, packed, bias):
        ctx.packed = packed
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")

    @staticmethod
    def backward(ctx, grad):
        grad_x = grad.matmul(ctx.packed.to_dense()) if ctx.needs_input_grad[0] else None
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias


class _Packed:
    """A base linear's forward: the packed weight where it gives the plain product, the plain weight otherwise.
    ``only``: the packed copy is the only one (the module's weight is a :class:`_Placeholder`), and forwards with
    gradients read it too. It holds its module weakly (the module holds it as ``forward``), so a dropped model
    frees both without waiting for the cycle collector. A deep copy or an unpickled copy of the module has its
    plain weight back and packs it at its first forward without gradients."""

    __slots__ = ("module", "packed", "version", "pointer", "dtype", "only")

    def __init__(self, module: torch.nn.Linear, lazy: bool = False, only: bool = False):
        self.module = weakref.ref(module)
        self.packed = None
        self.only = False
        if not lazy:
            self._pack(module)
            if only:
                module.weight = _Placeholder(module.weight, self.packed)
                self.version, self.pointer, self.only = module.weight._version, module.weight.data_ptr(), True
                if _dense_state not in module._state_dict_hooks.values():
                    module._register_state_dict_hook(_dense_state)

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

    def plain(self, module: torch.nn.Linear) -> torch.Tensor:
        """The module's weight as a plain tensor: unpacked where the packed copy is the only one."""
        weight = module.weight
        if isinstance(weight, _Placeholder):
            if not self.fresh(module):  # its storage converted (``model.to(dtype)``): no plain weight is left
                raise RuntimeError("a prepacked weight was converted or replaced in place; unpack the model "
                                   "(LocalEngine.set_prepack(False)) before changing its base weights")
            return weight.dense()
        return weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        module = self.module()
        grad = torch.is_grad_enabled()
        if self.packed is None and not grad:
            self._pack(module)
        if (x.dtype != self.dtype or x.device.type != "cpu" or not x.is_contiguous() or not self.fresh(module)
                or (grad and not self.only) or (torch.is_autocast_enabled("cpu")
                                                 and torch.get_autocast_dtype("cpu") != x.dtype)):
            # (autocast to the input's own dtype casts nothing: an update of a bf16 model runs under bf16
            # autocast, and the packed product is then the plain one; to another dtype it would not be)
            return F.linear(x, self.plain(module), module.bias)
        if grad:
            return _PackedLinear.apply(x, self.packed, module.bias)
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


def _keeps_plain(model) -> set[int]:
    """The ids of the base linears whose plain weight stays beside the packed copy: the output head (an update's
    fused LM head reads its weight) and any whose weight another module shares (a head tied to the embedding)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    owners: dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners[id(param)] = owners.get(id(param), 0) + 1
    return {id(m) for m in base_linears(model) if m is head or owners.get(id(m.weight), 0) > 1}


def prepack(model) -> int:
    """Pack every base linear of ``model`` (idempotent); returns how many are packed. The packed copy replaces
    the plain weight, except where :func:`_keeps_plain` says."""
    keep = _keeps_plain(model)
    count = 0
    for module in base_linears(model):
        packed = module.__dict__.get("forward")
        if not (isinstance(packed, _Packed) and packed.fresh(module)):
            if isinstance(packed, _Packed) and isinstance(module.weight, _Placeholder):
                packed.plain(module)  # refuses: a converted placeholder has no weight left to pack
            module.forward = _Packed(module, only=id(module) not in keep)
        count += 1
    return count


def unpack(model) -> None:
    """Back to plain weights and ``F.linear`` everywhere; the packed copies are freed."""
    for module in base_linears(model):
        packed = module.__dict__.get("forward")
        if isinstance(packed, _Packed):
            if isinstance(module.weight, _Placeholder):
                module.weight = torch.nn.Parameter(packed.plain(module), requires_grad=False)
            del module.forward


def plain_weights_dropped(model) -> int:
    """How many base linears hold their weight packed only."""
    return sum(isinstance(m.weight, _Placeholder) for m in base_linears(model))


def packed_count(model) -> int:
    """How many base linears are served from packed weights now."""
    return sum(isinstance(m.__dict__.get("forward"), _Packed) for m in base_linears(model))
