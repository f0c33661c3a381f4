"""Sharding over Ray (``--ray``): a local Ray instance with 2 actors, each with its own engine on the tiny model,
gives the same greedy results as a local run, in the same run folder layout; an actor killed mid-run (its process
ends, as on a lost node) loses nothing and duplicates nothing."""

from __future__ import annotations

import json
import sys

import pytest

from test_resume import compare, outcome, run_cli

pytest.importorskip("ray", reason="the Ray extra is not installed (pip install 'rosa2-dspy[ray]')")

RAY = ("--ray", "--ray-actors", "2")


def test_a_comparison_on_two_ray_actors_matches_a_local_run_and_survives_a_killed_actor(lively_model_dir, tmp_path,
                                                                                       monkeypatch, capsys):
    import ray

    from rosa2_dspy.cli import main
    from rosa2_dspy.distributed import RayWorkers

    local = compare(lively_model_dir, tmp_path / "local")
    assert local.returncode == 0, local.stderr[-2000:]
    # the same command in this process, on Ray; when the first record comes back, actor 0 (with items of its own
    # still in flight: all 6 conversations are handed out at once, 3 to each actor) is killed
    finish, killed = RayWorkers._finish, []

    def finish_then_kill(self, ref):
        finish(self, ref)
        if not killed:
            killed.append(self.kill_actor(0))

    monkeypatch.setattr(RayWorkers, "_finish", finish_then_kill)
    args = ["bench", "compare", "--methods", "single,ttt", "--split", "test", "--level", "1", "--limit", "3",
            "--turns", "2", "--samples", "1", "--user", "sharded", "--model", str(lively_model_dir), "--dtype",
            "float32", "--max-tokens", "12", "--threads", "2", "--no-progress", "--out", str(tmp_path / "ray"), *RAY]
    try:
        assert main(args) == 0
    finally:
        ray.shutdown()
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("ray: "))
    assert line.startswith("ray: 2 actors, 1 lost, ") and "1 replacements started" in line, line
    # the killed actor's items ran elsewhere: how many depends on timing (a reply the actor had already returned
    # is kept, the CI run of session 11 saw 1 of 3), but never none
    assert int(line.split(", ")[2].split()[0]) >= 1, line
    expected = outcome(tmp_path / "local")
    assert any(r["l2_shift"] > 0 for r in expected["ttt"].values())  # the updates ran, in the actors too
    assert outcome(tmp_path / "ray") == expected  # every problem once, the same conversations
    summary = json.loads((tmp_path / "ray" / "summary.json").read_text())["methods"]
    assert summary["ttt"]["problems"] == 3 and (tmp_path / "ray" / "report.html").is_file()


def test_an_eval_on_ray_answers_as_a_local_eval(tiny_model_dir, tmp_path):
    def run(out, *extra):
        args = ["eval", "--split", "test", "--level", "1", "--limit", "4", "--model", str(tiny_model_dir),
                "--dtype", "float32", "--max-tokens", "8", "--threads", "2", "--no-progress", "--out", str(out), *extra]
        done = run_cli(args)
        assert done.returncode == 0, done.stderr[-3000:]
        records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
        return done, {r["unique_id"]: (r["prediction"], r["reasoning"], r["correct"]) for r in records}

    _, local = run(tmp_path / "local")
    done, sharded = run(tmp_path / "ray", *RAY)
    assert len(local) == 4 and sharded == local
    summary = json.loads((tmp_path / "ray" / "summary.json").read_text())
    assert summary["ray"]["actors"] == 2 and summary["problems"] == 4 and summary["dtype"] == "float32"
    assert "ray: 2 actors, 0 lost" in done.stdout


def test_a_missing_ray_is_one_line_and_exit_2(tiny_model_dir, tmp_path, monkeypatch):
    from rosa2_dspy.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    code = main(["eval", "--split", "test", "--limit", "1", "--model", str(tiny_model_dir), "--ray", "--no-progress",
                 "--out", str(tmp_path / "r")])
    assert code == 2
