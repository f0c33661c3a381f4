"""The ``rosa2`` command: ``eval``, ``compile``, ``bench``, ``shards`` and ``info``, a thin shell over the library
(:mod:`rosa2_dspy.experiments`): ``parser`` declares the flags, ``common`` reads a run's identity from them,
``run`` and ``tools`` hold the commands, and :func:`main` turns bad input into one line and exit code 2."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading

from rosa2_dspy.cli.common import CLIError
from rosa2_dspy.cli.parser import build_parser
from rosa2_dspy.cli.run import cmd_compile, cmd_eval
from rosa2_dspy.cli.tools import cmd_bench, cmd_info, cmd_report, cmd_shards
from rosa2_dspy.experiments import quiet_libraries

EXIT_BAD_INPUT = 2


def _check_ranges(args) -> None:
    """Flags shared by several commands, refused before anything loads or is written."""
    for flag, low in (("max_tokens", 1), ("threads", 1), ("turns", 1), ("samples", 0), ("temperature", 0.0)):
        value = getattr(args, flag, None)
        if value is not None and value < low:
            raise CLIError(f"--{flag.replace('_', '-')} must be >= {low}, got {value}")
    for flag in ("max_shift", "learning_rate"):
        value = getattr(args, flag, None)
        if value is not None and not value > 0:
            raise CLIError(f"--{flag.replace('_', '-')} must be > 0, got {value}")
    if getattr(args, "device", None) is not None:  # a device or dtype that cannot be had, before any run folder
        from rosa2_dspy.models import pick_device, pick_dtype

        pick_dtype(pick_device(args.device), args.dtype)


class Interrupted(KeyboardInterrupt):
    """A stop signal, raised in the main thread like Ctrl-C (Python's own SIGINT handler)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _interrupt(signum, frame):
    for sig in STOP_SIGNALS:  # once: a second signal must not break into the stopping (run_items lets go of
        signal.signal(sig, _already_stopping)  # its threads inside engine.refusing(), then writes the segment)
    raise Interrupted(signum)


def _already_stopping(signum, frame):
    print("rosa2: already stopping (conversations in flight are being let go)", file=sys.stderr, flush=True)


# the commands whose long work lets its threads go when interrupted (evaluation.run_items; a bench compile's
# DSPy executors: experiments._let_go_when_interrupted), so that SIGTERM can stop them as Ctrl-C does
STOPPABLE = {("eval", None), ("bench", "compare"), ("bench", "compile")}


@contextlib.contextmanager
def _stoppable(args):
    """For a run (:data:`STOPPABLE`), SIGINT and SIGTERM stop it as Ctrl-C does (what finished is saved, the
    segment line written), once: ``kill PID`` otherwise ends the process where it stands, and a shell starts a
    background job (``nohup ... &``) with SIGINT ignored, so ``kill -INT`` did nothing. Only the main thread can
    take signals."""
    if (threading.current_thread() is not threading.main_thread()
            or (args.command, getattr(args, "bench", None)) not in STOPPABLE):
        yield
        return
    previous = {sig: signal.signal(sig, _interrupt) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


COMMANDS = {"eval": cmd_eval, "compile": cmd_compile, "info": cmd_info, "bench": cmd_bench, "shards": cmd_shards,
            "report": cmd_report}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_libraries()
    from rosa2_dspy.artifacts import ArtifactError
    from rosa2_dspy.distributed import RayError
    from rosa2_dspy.evaluation import RunError
    from rosa2_dspy.math.data import DataError
    from rosa2_dspy.models import ModelError
    from rosa2_dspy.program_loader import ProgramError

    try:
        _check_ranges(args)
        with _stoppable(args):
            return COMMANDS[args.command](args)
    except (CLIError, ArtifactError, DataError, ModelError, ProgramError, RunError, ValueError) as exc:
        print(f"rosa2: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RayError as exc:  # every actor lost: what finished is saved
        print(f"rosa2: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        print(f"rosa2: stopped by {signal.Signals(signum).name}; finished problems are saved, rerun the same "
              f"command to resume", file=sys.stderr)
        return 128 + signum
