"""Kill and resume: a `bench compare` (the sharded user) SIGKILLed at failpoints (during generation, during an
update, right after a record is written), or stopped by SIGTERM or SIGINT while a generation never ends, and
rerun ends with the same greedy results as an uninterrupted run, with no duplicate or torn records
(rosa2_dspy/faults.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = "import sys; from rosa2_dspy.cli import main; sys.exit(main(sys.argv[1:]))"


def cli_call(args: list[str], failpoints: str | None = None) -> tuple[list[str], dict]:
    """The command line and environment that run ``rosa2 <args>`` in a child process, with ``failpoints`` armed
    (or none, whatever the calling shell had set)."""
    env = {k: v for k, v in os.environ.items() if k != "ROSA2_FAILPOINTS"}
    if failpoints:
        env["ROSA2_FAILPOINTS"] = failpoints
    return [sys.executable, "-c", CLI, *args], env


def run_cli(args: list[str], failpoints: str | None = None) -> subprocess.CompletedProcess:
    command, env = cli_call(args, failpoints)
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _compare_args(model: Path, out: Path) -> list[str]:
    return ["bench", "compare", "--methods", "single,ttt", "--split", "test", "--level", "1", "--limit", "3",
            "--turns", "2", "--samples", "1", "--user", "sharded", "--model", str(model), "--dtype", "float32",
            "--max-tokens", "12", "--threads", "2", "--no-progress", "--out", str(out)]


def compare(model: Path, out: Path, failpoints: str | None = None) -> subprocess.CompletedProcess:
    return run_cli(_compare_args(model, out), failpoints)


def segment_lines(out: Path) -> list[dict]:
    path = out / "segments.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def compare_stopped(model: Path, out: Path, signum: int, stall_at: int) -> tuple[int, str]:
    """A compare whose ``stall_at``-th generation never ends, sent ``signum`` once it is stuck (:func:`stopped`)."""
    return stopped(*cli_call(_compare_args(model, out), f"generate.batch={stall_at}:stall"), signum)


def stopped(command: list[str], env: dict, signum: int) -> tuple[int, str]:
    """Runs ``command`` (whose ``env`` stalls a generation: the engine's worker never ends it) and sends it
    ``signum`` once it is stuck, as ``kill`` from a shell would, started as a shell starts a background job
    (``nohup ... &``), with SIGINT ignored. Returns its exit code and stderr; -9 if it had not ended 120 s after
    the signal."""
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    lines, stalled = [], threading.Event()

    def read():
        for line in proc.stderr:
            lines.append(line)
            if "failpoint generate.batch: stalled" in line:
                stalled.set()
        stalled.set()  # (it ended without stalling: the assertions below say so)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert stalled.wait(300), "".join(lines)[-2000:]
        proc.send_signal(signum)
        code = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = -9
    reader.join(10)
    return code, "".join(lines)


def outcome(out: Path) -> dict:
    """Each method's records, without what differs between any two runs (timings, machine time)."""
    kept = {}
    for method in ("single", "ttt"):
        lines = (out / method / "results.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]  # every line whole
        ids = [r["unique_id"] for r in records]
        assert len(ids) == len(set(ids)) == 3, f"{method}: {ids}"  # no duplicates, none missing
        kept[method] = {r["unique_id"]: {
            "solved": r["solved"], "turns_used": r["turns_used"], "l2_shift": r["l2_shift"], "error": r["error"],
            "posed": r.get("posed"),
            "turns": [{k: t.get(k) for k in ("statement", "reply", "answer", "correct", "feedback", "revealed")}
                      for t in r["turns"]],
        } for r in records}
    return kept


def test_a_compare_killed_at_failpoints_resumes_to_the_uninterrupted_result(lively_model_dir, tmp_path):
    reference = compare(lively_model_dir, tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-2000:]
    resumed = tmp_path / "resumed"
    # stopped while a generation never ends: promptly (the conversations waiting on the engine are let go, not
    # waited for), with a one-line message, the signal's exit code and the segment's line; nothing they had
    # not finished is written (the final comparison would see an error record)
    for signum, stall_at in ((signal.SIGTERM, 2), (signal.SIGINT, 1)):  # (a resumed run's first is new)
        segments_before = len(segment_lines(resumed))
        code, stderr = compare_stopped(lively_model_dir, resumed, signum, stall_at)
        name = signal.Signals(signum).name
        assert code == 128 + signum, (name, code, stderr[-2000:])
        assert f"rosa2: stopped by {name}; finished problems are saved" in stderr
        segments = segment_lines(resumed)
        assert len(segments) == segments_before + 1 and segments[-1]["outcome"] == "interrupted"
    for failpoints in ("results.appended=2", "generate.batch=2", "update.trained=1"):
        killed = compare(lively_model_dir, resumed, failpoints)
        assert killed.returncode == -9, (failpoints, killed.returncode, killed.stderr[-2000:])
    final = compare(lively_model_dir, resumed)
    assert final.returncode == 0, final.stderr[-2000:]
    expected = outcome(tmp_path / "reference")
    assert any(r["l2_shift"] > 0 for r in expected["ttt"].values())  # the updates really ran
    assert outcome(resumed) == expected
    summary = json.loads((resumed / "summary.json").read_text())["methods"]
    uninterrupted = json.loads((tmp_path / "reference" / "summary.json").read_text())["methods"]
    for method in ("single", "ttt"):
        for key in ("problems", "solved", "mean_turns", "mean_l2_shift", "cumulative_accuracy_by_turn"):
            assert summary[method][key] == uninterrupted[method][key], (method, key)


def test_a_drain_signal_starts_nothing_new_and_keeps_what_was_in_flight(tmp_path):
    """kill -USR1 on a long run: the items not yet started are dropped, the ones in flight finish and are written,
    and the same call again goes on with the rest (killing the run would lose the ones in flight)."""
    import signal
    import threading
    import time
    from types import SimpleNamespace

    from rosa2_dspy.evaluation import DRAIN_SIGNAL, ResultsFile, run_items

    started, release, two_started = [], threading.Event(), threading.Event()

    def solve(item):
        started.append(item.unique_id)
        if len(started) == 2:
            two_started.set()
        assert release.wait(30)
        return {"unique_id": item.unique_id, "correct": True}

    def signal_then_release():
        assert two_started.wait(30)
        os.kill(os.getpid(), DRAIN_SIGNAL)  # to the process, as from a shell: any thread may receive it
        time.sleep(1.5)
        release.set()

    items = [SimpleNamespace(unique_id=f"p{i}") for i in range(5)]
    path = tmp_path / "results.jsonl"
    before = signal.getsignal(DRAIN_SIGNAL)
    helper = threading.Thread(target=signal_then_release)
    helper.start()
    run_items(items, solve, ResultsFile(path), threads=2, progress=False)
    helper.join()
    assert sorted(started) == ["p0", "p1"] and sorted(ResultsFile(path).records) == ["p0", "p1"]
    assert signal.getsignal(DRAIN_SIGNAL) == before
    run_items(items, solve, ResultsFile(path), threads=2, progress=False)
    assert sorted(ResultsFile(path).records) == [f"p{i}" for i in range(5)] and len(started) == 5


def test_a_bench_compile_stopped_by_sigterm_mid_compile_lets_go_and_resumes(tiny_model_dir, tmp_path):
    """SIGTERM while a compile's DSPy threads wait on a generation that never ends: the run stops promptly (its
    threads let go, not waited for), says so, exits with the signal's code and writes its segment line; the
    compile left no artifact, and the same command then compiles and evaluates it from the start."""
    recipe = tmp_path / "boot.toml"  # bootstrapping traces runs the program through DSPy's executor threads
    recipe.write_text("[optimizer]\nkind = 'lora'\nsources = ['bootstrap']\n[update]\n"
                      "objective = 'sft'\nsteps = 1\nbatch_size = 2\nlearning_rate = 0.01\nmax_length = 128\n")
    out = tmp_path / "cmp"

    def args(recipes: str) -> list[str]:
        return ["bench", "compile", "--recipes", recipes, "--limit", "2", "--val-limit", "1", "--eval-limit", "2",
                "--model", str(tiny_model_dir), "--dtype", "float32", "--max-tokens", "8", "--threads", "2",
                "--no-progress", "--out", str(out)]

    baseline = run_cli(args(""))
    assert baseline.returncode == 0, baseline.stderr[-2000:]  # the baseline evaluated: the next generation compiles
    code, stderr = stopped(*cli_call(args(str(recipe)), "generate.batch=1:stall"), signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, (code, stderr[-2000:])
    assert "rosa2: stopped by SIGTERM" in stderr
    assert segment_lines(out)[-1]["outcome"] == "interrupted"
    assert not (out / "boot" / "artifact" / "compile.json").exists()
    resumed = run_cli(args(str(recipe)))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())["methods"]
    assert list(summary) == ["baseline", "boot"] and summary["boot"]["problems"] == 2
    assert segment_lines(out)[-1]["outcome"] == "finished"
