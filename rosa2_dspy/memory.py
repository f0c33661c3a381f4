"""This process's memory: its resident size and high-water mark, and which phase of a long run raised the mark
(:class:`PeakWatch`). Linux only where it says so; elsewhere the readings are None and nothing is recorded."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import resource
from pathlib import Path


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Start this process's peak resident memory over from now (Linux: ``/proc/self/clear_refs``), so that
    :func:`peak_rss_since_reset_mib` measures one phase (an update after the model load). False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_since_reset_mib() -> float | None:
    """The peak resident memory since :func:`reset_peak_rss` (``VmHWM``), in MiB; None off Linux."""
    now = rss_and_peak_mib()
    return None if now is None else now[1]


def rss_and_peak_mib() -> tuple[float, float] | None:
    """This process's resident memory now and its high-water mark (``VmRSS``, ``VmHWM``), in MiB; None off Linux."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024
    except (OSError, ValueError, KeyError, IndexError):
        return None


class PeakWatch:
    """Which phase of a long run raised its memory peak, and what was in memory then.

    Around each phase (a decode step, a weight update) :meth:`watch` reads ``VmRSS`` and ``VmHWM`` before and
    after (about 30 us each). When the high-water mark rose during the phase, ``record[kind]`` becomes the new
    mark, the resident memory the phase started from, the cheap ``facts`` the caller gave and, read only then,
    ``dear_facts()`` (after the phase). A rise between watched phases (another thread's work) is recorded as
    ``"between"``. The kind with the highest mark set the process's peak; a timed run's ``segments.jsonl`` keeps
    the record, so a peak over a memory target names its phase without another run."""

    def __init__(self):
        self.record: dict[str, dict] = {}
        self._last: float | None = None

    @contextlib.contextmanager
    def watch(self, kind: str, facts: dict | None = None, dear_facts=None):
        before = rss_and_peak_mib()
        if before is None:
            yield
            return
        if self._last is not None and before[1] > self._last:
            self.record["between"] = {"peak_rss_mib": round(before[1], 1)}
        try:
            yield
        finally:
            after = rss_and_peak_mib()
            if after is not None:
                if after[1] > before[1]:
                    self.record[kind] = {"peak_rss_mib": round(after[1], 1), "rss_before_mib": round(before[0], 1),
                                         **(facts or {}), **(dear_facts() if dear_facts else {})}
                self._last = after[1]

    def peak(self) -> tuple[str, dict] | None:
        """The kind of phase that set the highest mark recorded, and its record."""
        return highest_mark(self.record)


def highest_mark(record: dict[str, dict]) -> tuple[str, dict] | None:
    """Of a :class:`PeakWatch` record (live, or read back from ``segments.jsonl``), the kind of phase that set the
    highest mark and its entry; None for an empty record."""
    return max(record.items(), key=lambda item: item[1]["peak_rss_mib"]) if record else None


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library is not glibc (musl, macOS, Windows)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError, TypeError):
        return None


def release_free_heap() -> float | None:
    """Hand the C heap's free pages back to the kernel (glibc's ``malloc_trim(0)``, every arena) and return how
    much the resident size fell, in MiB; None where there is no glibc.

    glibc keeps memory that PyTorch freed (chunks under its mmap threshold, up to 32 MiB each) for reuse, and
    a long run's resident size grows by what its largest phases once needed. Called before a weight update, it
    lowers the base that the update's own peak stacks on. It changes no tensor; it costs the walk of the free
    lists and the page faults of whatever is later allocated there again."""
    trim = _malloc_trim()
    if trim is None:
        return None
    before = rss_and_peak_mib()
    trim(0)
    after = rss_and_peak_mib()
    return None if before is None or after is None else max(0.0, before[0] - after[0])
