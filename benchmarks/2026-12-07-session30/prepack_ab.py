"""Prepacked float32 weights against plain ones, in fresh processes (session 30). On a CPU without native bf16 the
default model runs in float32, where until this A/B the engine packed its weights only on request (``--prepack``): a
packed product rounds differently from a plain one, so it is a choice a run folder records. Session 23 measured one
unrepeated 1.94x per decode step at batch 16; this measures the decode step and a weight update, A B B A.

One process per setting, in the order plain, packed, packed, plain. Each loads the model once
(``LocalEngine.from_pretrained(model, prepack=...)``), then runs ``cycles`` times: ``steps`` decode steps of a
continuous batch of ``rows`` MATH train prompts in the engine's decoder (ms per step), then one weight update of the
session's default config on session 25's uneven rejected replies (two of 500 and 800 tokens under a 470-token
prompt), timed, with the resident memory before it and the kernel's peak during it. The first cycle is a warm-up;
the rest are averaged. Prints JSON (each child's line on stderr as it ends).
Usage: python prepack_ab.py [--model M] [--cycles C] [--rows R] [--steps S]   (the parent: runs the children)
       python prepack_ab.py child SETTING MODEL C R S"""

import importlib.util
from pathlib import Path


def _trim_ab():
    """Session 29's trim A/B, whose measurement and A B B A driver this reuses (one copy of each)."""
    path = Path(__file__).resolve().parent.parent / "2026-12-07-session29" / "trim_ab.py"
    spec = importlib.util.spec_from_file_location("trim_ab", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def child(setting: str, model: str, cycles: int, rows: int, steps: int) -> dict:
    from rosa2_dspy.engine import LocalEngine

    engine = LocalEngine.from_pretrained(model, prepack=setting == "packed")
    assert engine.prepacked == (setting == "packed")
    return _trim_ab().measure(engine, setting, cycles, rows, steps)


if __name__ == "__main__":
    _trim_ab().run_from_argv(__file__, child, ("plain", "packed", "packed", "plain"), 2, 16, 32)
