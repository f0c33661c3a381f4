"""Grading MATH answers: math-verify as the judge, a strict Hendrycks-style match beside it.

The predicted answer is the content of the prediction's last ``\\boxed{}`` (or the text
itself when nothing is boxed). math-verify's own timeouts use ``signal.alarm`` and raise
inside threads, so they are switched off and each judgement runs in a worker process
that is killed and replaced when it overruns: no answer can hang or crash a run.
"""

from __future__ import annotations

import multiprocessing as mp
import re
import threading
from dataclasses import asdict, dataclass

DEFAULT_TIMEOUT = 5.0


# ----------------------------------------------------------------------------- extraction


def last_boxed(text: str | None) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (brace-matched), or None."""
    if not text:
        return None
    starts = [m for m in re.finditer(r"\\(?:boxed|fbox)\s*", text)]
    for match in reversed(starts):
        i = match.end()
        if i < len(text) and text[i] == "{":
            depth, j = 0, i
            while j < len(text):
                if text[j] == "\\" and j + 1 < len(text) and text[j + 1] in "{}":
                    j += 2
                    continue
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1:j].strip()
                j += 1
            continue  # unbalanced: try an earlier box
        if match.group(0).endswith(" ") or (i < len(text) and text[i].isalnum()):
            tail = re.match(r"\s*([^\s$]+)", text[i:])  # the brace-less form: \boxed 2
            if tail:
                return tail.group(1).rstrip(".")
    return None


# ----------------------------------------------------------------------------- strict match


def _fix_fracs(s: str) -> str:
    parts = s.split("\\frac")
    out = parts[0]
    for part in parts[1:]:
        out += "\\frac"
        if part.startswith("{") or len(part) < 2:
            out += part
            continue
        a, b, rest = part[0], part[1], part[2:]
        out += "{" + a + "}" + (b + rest if b == "{" else "{" + b + "}" + rest)
    return out


def _fix_a_slash_b(s: str) -> str:
    if s.count("/") != 1:
        return s
    a, b = s.split("/")
    return f"\\frac{{{a}}}{{{b}}}" if a.isdigit() and b.isdigit() else s


def _fix_sqrt(s: str) -> str:
    return re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)


def strict_normalize(answer: str) -> str:
    """Hendrycks et al.'s answer normalisation (``strip_string`` in the MATH release)."""
    s = answer.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac").replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\$", "").replace("$", "")
    s = re.sub(r"\\text\{\s*[a-zA-Z ]*\}$", "", s) if re.search(r"\d", s) else s  # trailing units
    s = s.replace("\\%", "").replace("%", "").replace(" .", " 0.").replace("{.", "{0.")
    if s.startswith("."):
        s = "0" + s
    if len(s.split("=")) == 2 and len(s.split("=")[0]) <= 2:
        s = s.split("=")[1]
    s = _fix_sqrt(s).replace(" ", "")
    s = _fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _fix_a_slash_b(s)


def answer_key(answer: str | None) -> str | None:
    """An answer as compared with another (a rejected one, the last turn's): its last boxed content (or the text),
    normalised as the strict grader does; None for no answer."""
    if not answer:
        return None
    inner = last_boxed(answer) if "\\boxed" in answer else answer
    return strict_normalize(inner) if inner else None


def strict_equal(prediction: str | None, gold: str) -> bool:
    if prediction is None:
        return False
    try:
        return strict_normalize(prediction) == strict_normalize(gold)
    except Exception:  # noqa: BLE001 - normalisation never fails a run
        return prediction.strip() == gold.strip()


# ----------------------------------------------------------------------------- math-verify in a worker


def _verify(gold: str, predicted: str, boxed: bool) -> bool:
    from math_verify import parse, verify

    gold_parsed = parse("\\boxed{" + gold + "}", parsing_timeout=None)
    if boxed:
        pred_parsed = parse("\\boxed{" + predicted + "}", parsing_timeout=None)
    else:
        pred_parsed = parse(predicted, parsing_timeout=None)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


def _worker(conn) -> None:  # pragma: no cover - runs in the child process
    import logging
    import signal

    # a terminal's Ctrl-C reaches the whole process group: the parent stops its run, and a grade in flight
    # still gets its answer (a dead worker would be restarted, a two-minute warm-up for nothing)
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        try:
            conn.send(("ok", _verify(*job)))
        except Exception as exc:  # noqa: BLE001
            conn.send(("error", f"{type(exc).__name__}: {exc}"[:200]))


WARM_UP_SECONDS = 120.0  # a new worker's imports (sympy, math-verify) and first parse, outside any grade's timeout


class _VerifyWorker:
    """A spawned process that runs math-verify; replaced whenever it times out or dies.

    A new worker is warmed (its imports and a first judgement) before it is given an answer, so a
    grade's timeout only ever measures that answer: after one pathological answer the next grades
    are judged by math-verify again, in normal time. The child imports only this module (the
    ``rosa2_dspy.math`` package imports nothing eagerly), never DSPy or torch."""

    def __init__(self):
        self._lock = threading.Lock()
        self._proc = None
        self._conn = None
        self.started = 0  # workers started (a replacement after a timeout or a crash counts)

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        self._proc = ctx.Process(target=_worker, args=(child,), daemon=True, name="rosa2-grader")
        self._proc.start()
        child.close()
        self._conn = parent
        self.started += 1
        self._conn.send(("1", "1", True))  # warm up: imports and math-verify's first parse
        if not self._conn.poll(WARM_UP_SECONDS):
            self._kill()
            raise TimeoutError(f"the math-verify worker did not start within {WARM_UP_SECONDS:g}s")
        self._conn.recv()

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.join(timeout=5)
        self._proc = self._conn = None

    def __call__(self, gold: str, predicted: str, boxed: bool, timeout: float) -> tuple[bool, str | None]:
        with self._lock:
            try:
                if self._proc is None or not self._proc.is_alive():
                    self._start()
                self._conn.send((gold, predicted, boxed))
                if not self._conn.poll(timeout):
                    self._kill()
                    return False, f"math-verify timed out after {timeout:g}s"
                status, value = self._conn.recv()
            except (EOFError, OSError, BrokenPipeError, TimeoutError) as exc:
                self._kill()
                return False, f"math-verify worker died: {type(exc).__name__}"
            if status == "error":
                return False, f"math-verify error: {value}"
            return bool(value), None

    def close(self) -> None:
        with self._lock:
            self._kill()


_WORKER = _VerifyWorker()


# ----------------------------------------------------------------------------- public surface


@dataclass
class Grade:
    """The judgement of one prediction against a gold answer."""

    correct: bool       # math-verify says the values are equal
    strict: bool        # Hendrycks-style normalised strings are equal
    boxed: bool         # the prediction contains a \\boxed{} answer
    extracted: str      # the answer that was judged
    reason: str | None = None  # why it is wrong when nothing could be judged (empty, timeout, ...)
    fallback: bool = False  # math-verify could not judge it (timeout, crash, error): the strict match decided

    def to_dict(self) -> dict:
        return asdict(self)


def grade(prediction: str | None, gold: str, *, timeout: float = DEFAULT_TIMEOUT) -> Grade:
    """Judge a prediction (an answer field or a whole completion) against the gold answer."""
    text = (prediction or "").strip()
    if not text:
        return Grade(False, False, False, "", "empty answer")
    boxed_content = last_boxed(text)
    boxed = boxed_content is not None
    extracted = boxed_content if boxed else text
    if not extracted:
        return Grade(False, False, boxed, "", "empty \\boxed{}")
    correct, reason = _WORKER(gold, extracted, boxed, timeout)
    strict = strict_equal(extracted, gold)
    return Grade(correct or strict, strict, boxed, extracted, None if (correct or strict) else reason,
                 fallback=reason is not None)


def shutdown() -> None:
    """Stop the grading worker (it also stops with the process)."""
    _WORKER.close()
