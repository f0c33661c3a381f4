"""An update's shared prompt run once, and each row to its own end, against today's update, in fresh processes
(session 31). A later update of a conversation trains on every rejected reply under one prompt: today it runs that
prompt once per row, and every row up to the longest one's end, in its no-gradient prefix, its gradient columns and
its reference forward. ``UpdateConfig.share_prefix`` runs the shared columns once, on one row, and each row to its
own last token; the update is the same up to rounding.

One process per setting, in the order off, on, on, off. Each loads the model once, then runs ``cycles`` times:
``steps`` decode steps of a continuous batch of ``rows`` MATH train prompts in the engine's decoder, then one weight
update of the session's default config (``share_prefix`` as the setting says) on session 25's uneven rejected replies
(two of 500 and 800 tokens under a 470-token prompt), timed, with the resident memory before it and the kernel's peak
during it. The first update starts from the base weights (its reference is the policy's forward), the second from
moved weights (it runs the reference forward); the first cycle is the summary's warm-up, and each cycle's figures are
in the JSON. Prints JSON (each child's line on stderr as it ends).
Usage: python share_prefix_ab.py [--model M] [--cycles C] [--rows R] [--steps S]   (the parent: runs the children)
       python share_prefix_ab.py child SETTING MODEL C R S"""

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
    from rosa2_dspy.coadapt import session_update_config
    from rosa2_dspy.engine import LocalEngine

    engine = LocalEngine.from_pretrained(model)
    return _trim_ab().measure(engine, setting, cycles, rows, steps,
                              update=session_update_config(share_prefix=setting == "shared"))


if __name__ == "__main__":
    _trim_ab().run_from_argv(__file__, child, ("whole", "shared", "shared", "whole"), 2, 16, 8)
