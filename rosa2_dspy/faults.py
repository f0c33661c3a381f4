"""Failpoints for crash tests: kill the process at a named point, as a power cut or an OOM killer would.

``ROSA2_FAILPOINTS="update.trained=3,generate.batch=5"`` kills the process with SIGKILL the 3rd time
the update path reaches ``update.trained`` (the adapter changed, the update not yet accepted) and the
5th time a batch is about to generate (or, with continuous batching, rows are about to join the running
batch), whichever comes first. ``generate.batch=2:stall`` instead stops the thread that gets there for good, after
a line on stderr (``failpoint generate.batch: stalled``): a generation that never ends, for a test of how a run is
stopped. Unset (always, outside tests), a failpoint costs one dictionary lookup. The kill-and-resume tests in
``tests/test_resume.py`` use it.
"""

from __future__ import annotations

import collections
import os
import signal
import sys
import threading

_ENV = "ROSA2_FAILPOINTS"
_hits: collections.Counter = collections.Counter()
_lock = threading.Lock()


def _plan() -> dict[str, tuple[int, str]]:
    spec = os.environ.get(_ENV, "")
    plan = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, when = item.partition("=")
        count, _, action = when.partition(":")
        plan[name.strip()] = (int(count or 1), action.strip() or "kill")
    return plan


def failpoint(name: str) -> None:
    """Kill this process here when ``ROSA2_FAILPOINTS`` names ``name`` and its count is reached."""
    if _ENV not in os.environ:
        return
    planned = _plan().get(name)
    if planned is None:
        return
    at, action = planned
    with _lock:
        _hits[name] += 1
        if _hits[name] < at:
            return
    if action == "stall":
        print(f"failpoint {name}: stalled", file=sys.stderr, flush=True)
        threading.Event().wait()
    os.kill(os.getpid(), signal.SIGKILL)
