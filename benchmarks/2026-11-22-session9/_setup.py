"""What decode_rows.py and prefill_rows.py share: the default model with K random LoRA adapters pinned, and a
row tag naming a row's weights as the engine's forward context reads it. Only engine APIs that the compared
checkouts (d68ad98 and later) all have."""
import torch

from rosa2_dspy.engine import GenSettings, LocalEngine


def engine_with_pins(adapters: int):
    """The default model's engine and ``adapters`` pinned random adapters (seeded, as in session 8's scripts)."""
    engine = LocalEngine.shared("default")
    engine.attach_adapter()
    g = torch.Generator().manual_seed(0)
    pins = []
    for _ in range(adapters):
        with torch.no_grad():
            for name, t in engine.adapter_state().items():
                t.copy_(torch.randn(t.shape, generator=g) * (0.01 if "lora_B" in name else 0.05))
        engine.mark_changed()
        pins.append(engine.pin())
    return engine, pins


class Tag:
    """A row's handle as the engine's forward context reads it: its settings, with the weights it asks for."""

    def __init__(self, weights, max_tokens: int):
        self.settings = GenSettings(max_tokens=max_tokens, do_sample=False, temperature=0.0, top_p=None, top_k=None,
                                    seed=None, weights=weights)
