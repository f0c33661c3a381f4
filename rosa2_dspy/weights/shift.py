"""Shift accounting: the L2 norm of the weight change an adapter represents, and sequence log-probabilities."""

from __future__ import annotations

import contextlib
import math

import torch

from rosa2_dspy.engine import LocalEngine, lora_layers
from rosa2_dspy.weights.config import Shift



def _factors(modules: dict, state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """module name -> (A, B, scaling) taken from an adapter state dict (live or snapshot)."""
    out = {}
    for name, module in modules.items():
        a = state[f"{name}.lora_A.default.weight"]
        b = state[f"{name}.lora_B.default.weight"]
        out[name] = (a, b, float(module.scaling["default"]))
    return out


def _diff_norm_sq(a1, b1, a0, b0, scaling: float) -> float:
    """||s (B1 A1 - B0 A0)||_F^2 from the factors, without forming the big matrices.

    With U = [B1, -B0] and V = [A1; A0], B1 A1 - B0 A0 = U V and ||U V||^2 = sum((U^T U) * (V V^T)).
    """
    u = torch.cat([b1, -b0], dim=1).double() if b0 is not None else b1.double()
    v = torch.cat([a1, a0], dim=0).double() if a0 is not None else a1.double()
    value = float(((u.T @ u) * (v @ v.T)).sum()) * scaling * scaling
    return max(value, 0.0)


def adapter_shift(engine: LocalEngine, since: dict[str, torch.Tensor] | None = None,
                  state: dict[str, torch.Tensor] | None = None) -> Shift:
    """L2 norm of the weight change of ``state`` (default: the live adapter) relative to ``since``
    (default: the base model, i.e. ``sqrt(sum ||scaling B A||^2)``)."""
    if engine.peft_model is None:
        return Shift(0.0, {})
    modules = lora_layers(engine.peft_model)
    # the live adapter is read under the weights lock; given tensors (pinned snapshots) need no lock, so a
    # conversation ending never waits for a batch that is generating
    live = engine.weights_lock if state is None else contextlib.nullcontext()
    with live, torch.no_grad():
        now = _factors(modules, state if state is not None else engine.adapter_state())
        ref = _factors(modules, since) if since is not None else None
        per = {}
        for name, (a1, b1, s) in now.items():
            a0, b0 = (ref[name][0], ref[name][1]) if ref is not None else (None, None)
            per[name] = math.sqrt(_diff_norm_sq(a1, b1, a0, b0, s))
    return Shift(math.sqrt(sum(v * v for v in per.values())), per)


def sequence_logprob(engine: LocalEngine, prompt: list[dict], completion: str) -> float:
    """Sum of the log-probabilities of ``completion`` as the assistant's reply to ``prompt``."""
    prompt_ids = engine.encode_chat(prompt)
    completion_ids = engine.tokenizer.encode(completion, add_special_tokens=False)
    ids = torch.tensor([prompt_ids + completion_ids], device=engine.device)
    with engine.weights_lock, torch.no_grad():
        logits = engine.model(input_ids=ids).logits[0, len(prompt_ids) - 1:-1].float()
    logps = torch.log_softmax(logits, dim=-1)
    return float(logps.gather(1, torch.tensor(completion_ids, device=engine.device)[:, None]).sum())
