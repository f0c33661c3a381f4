"""Plain progress lines for logs (a run's items, a compile's optimizer steps): done/total, elapsed, ETA."""

from __future__ import annotations


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def progress_line(description: str, done: int, total: int, correct: int | None, elapsed: float) -> str:
    """One line of progress for a log: done/total, accuracy so far (``correct``; None: not graded), elapsed and the
    remaining time at this pace."""
    if not done:
        return f"{description}: 0/{total} done, elapsed {_clock(elapsed)}"
    eta = elapsed / done * (total - done)
    acc = "" if correct is None else f", acc {correct / done:.0%}"
    return f"{description}: {done}/{total} done{acc}, elapsed {_clock(elapsed)}, ETA {_clock(eta)}"
