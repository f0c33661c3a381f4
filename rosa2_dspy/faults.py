"""Failpoints for crash tests: kill the process at a named point, as a power cut or an OOM killer would.

``ROSA2_FAILPOINTS="update.trained=3,generate.batch=5"`` kills the process with SIGKILL the 3rd time
the update path reaches ``update.trained`` (the adapter changed, the update not yet accepted) and the
5th time a batch is about to generate (or, with continuous batching, rows are about to join the running
batch), whichever comes first. Unset (always, outside tests), a
failpoint costs one dictionary lookup. The kill-and-resume test in ``tests/test_resume.py`` uses it.
"""

from __future__ import annotations

import collections
import os
import signal
import threading

_ENV = "ROSA2_FAILPOINTS"
_hits: collections.Counter = collections.Counter()
_lock = threading.Lock()


def _plan() -> dict[str, int]:
    spec = os.environ.get(_ENV, "")
    plan = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, count = item.partition("=")
        plan[name.strip()] = int(count or 1)
    return plan


def failpoint(name: str) -> None:
    """Kill this process here when ``ROSA2_FAILPOINTS`` names ``name`` and its count is reached."""
    if _ENV not in os.environ:
        return
    at = _plan().get(name)
    if at is None:
        return
    with _lock:
        _hits[name] += 1
        if _hits[name] >= at:
            os.kill(os.getpid(), signal.SIGKILL)
