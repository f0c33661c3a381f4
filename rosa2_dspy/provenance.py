"""Where a run's records came from. A long run goes in segments (started, stopped, resumed in a later session,
perhaps on newer code): each segment appends one line to ``segments.jsonl`` in the run folder, saying when it
ran, on which code (the git commit of the checkout that holds the package, ``+dirty`` with uncommitted changes;
else the installed version), with which command, on what CPU (native bf16 or not, and the share of CPU time the
host's hypervisor gave to others while it ran: on a shared host a third, which no code change explains), and
what the engine did (rows per decode step, updates). Reports list the segments, so a reader sees whether one
commit made every record.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import subprocess
import sys
from pathlib import Path

from rosa2_dspy.fsutil import append_jsonl, read_jsonl
from rosa2_dspy.memory import highest_mark, peak_rss_mib

SEGMENTS = "segments.jsonl"


def cpu_ticks(stat: str | None = None) -> list[int] | None:
    """The machine's CPU time so far, in ticks, from the first line of ``/proc/stat`` (or the text ``stat``):
    user, nice, system, idle, iowait, irq, softirq, steal, ...; None where there is no such file."""
    try:
        text = stat if stat is not None else Path("/proc/stat").read_text()
    except OSError:
        return None
    return _parse(text)


def _parse(text: str) -> list[int] | None:
    fields = (text.splitlines() or [""])[0].split()
    if not fields or fields[0] != "cpu":
        return None
    return [int(x) for x in fields[1:]]


def stolen_fraction(before: list[int] | None, after: list[int] | None) -> float | None:
    """Of the CPU time between two :func:`cpu_ticks` readings, the share the hypervisor gave to other guests
    (``steal``, the 8th field) rather than to this machine's work or idling; None without both readings."""
    if not before or not after or len(before) < 8 or len(after) < 8:
        return None
    delta = [b - a for a, b in zip(before[:8], after[:8])]
    total = sum(delta)
    return round(delta[7] / total, 4) if total > 0 else None


def code_version() -> str:
    """The git commit of the checkout that holds this package (``+dirty`` when it has uncommitted changes), or
    the installed distribution's version outside a checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        from importlib import metadata

        try:
            return f"rosa2-dspy {metadata.version('rosa2-dspy')}"
        except metadata.PackageNotFoundError:
            return "unknown"


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


@contextlib.contextmanager
def segment(out: str | Path, engine=None):
    """Around one segment of a run in ``out``: on the way out (finished, drained, failed or interrupted) append
    its line to ``out/segments.jsonl``. ``engine``: the local engine, whose counters say what it did (its
    counters from this segment only). Yields the line, for the caller to add what it knows (items left)."""
    from rosa2_dspy import models

    started, ticks = _now(), cpu_ticks()
    stats_before = dict(engine.stats) if engine is not None else None
    line = {"started": started, "code": code_version(), "argv": sys.argv[1:], "cpu": models.cpu_description(),
            "cpu_native_bf16": models.cpu_has_native_bf16()}
    if engine is not None:
        line["prepacked"] = getattr(engine, "prepacked", None)
    outcome = "interrupted"
    try:
        yield line
        outcome = "finished" if not line.get("items_left") else "stopped early"
    except Exception as exc:
        outcome = f"failed: {type(exc).__name__}"
        raise
    finally:
        line.update({"ended": _now(), "outcome": outcome, "cpu_stolen": stolen_fraction(ticks, cpu_ticks()),
                     "peak_rss_mib": round(peak_rss_mib(), 1)})
        if engine is not None:
            stats = {k: v - stats_before.get(k, 0) if isinstance(v, (int, float)) and k != "max_batch_seen" else v
                     for k, v in engine.stats.items()}
            line["engine"] = {k: round(v, 3) if isinstance(v, float) else v for k, v in stats.items()}
        with contextlib.suppress(OSError):
            append_jsonl(Path(out) / SEGMENTS, line)


def read_segments(out: str | Path) -> list[dict]:
    """The segments a run folder records (torn or foreign lines skipped)."""
    return [item for item in read_jsonl(Path(out) / SEGMENTS) if isinstance(item, dict) and "started" in item]


_PHASES = {"step": "a decode step", "update": "a weight update", "batch": "a generation batch",
           "between": "work between the engine's steps and updates"}


def describe_peak(segment: dict) -> str:
    """A segment's peak RSS in words, with the phase that set it where the engine recorded one (:class:`PeakWatch`)."""
    if not segment.get("peak_rss_mib"):
        return ""
    text = f"peak RSS {segment['peak_rss_mib']:,.0f} MiB"
    record = (segment.get("engine") or {}).get("peak_set_by")
    if not record:
        return text
    kind, mark = highest_mark(record)
    held = [f"{mark['rss_before_mib']:,.0f} MiB resident before it"] if "rss_before_mib" in mark else []
    if mark.get("kv_cache_mib"):
        held.append(f"a {mark['kv_cache_mib']:,.0f} MiB KV cache")
    if mark.get("pinned_adapters"):
        held.append(f"{mark['pinned_adapters']} pinned adapters of {mark.get('pinned_mib', 0):,.0f} MiB")
    return text + f", set by {_PHASES.get(kind, kind)}" + (f" ({', '.join(held)})" if held else "")


def describe_segments(segments: list[dict]) -> str:
    """One line for a report: how many segments, on which code, how much CPU time the host stole, and the peak
    resident memory (with what set it)."""
    if not segments:
        return ""
    codes = list(dict.fromkeys(s.get("code", "unknown") for s in segments))
    stolen = [s["cpu_stolen"] for s in segments if s.get("cpu_stolen") is not None]
    cpus = list(dict.fromkeys(s["cpu"] for s in segments if s.get("cpu")))  # (lines before session 14 lack it)
    text = (f"Ran in {len(segments)} segment{'s' if len(segments) > 1 else ''} ({segments[0]['started']} to "
            f"{segments[-1].get('ended', '?')}) on code {', '.join(codes)}"
            + (f", on CPU{'s' if len(cpus) > 1 else ''} {'; '.join(cpus)}" if cpus else ""))
    if stolen:
        low, high = min(stolen), max(stolen)
        text += (f"; CPU time stolen by the host: {low:.0%}" if low == high else
                 f"; CPU time stolen by the host: {low:.0%} to {high:.0%} per segment")
    peaks = [s for s in segments if s.get("peak_rss_mib")]
    if peaks:
        text += "; " + describe_peak(max(peaks, key=lambda s: s["peak_rss_mib"]))
    return text + " (segments.jsonl)."
