"""Sharding over Ray (``--ray``): a local Ray instance with 2 actors, each with its own engine on the tiny model,
gives the same greedy results as a local run, in the same run folder layout; an actor killed mid-run (the
``ray.solved`` failpoint SIGKILLs it as it is about to send a record) loses nothing and duplicates nothing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from test_resume import CLI, ROOT, compare, outcome

pytest.importorskip("ray", reason="the Ray extra is not installed (pip install 'rosa2-dspy[ray]')")

RAY = ("--ray", "--ray-actors", "2")


def test_a_comparison_on_two_ray_actors_matches_a_local_run_and_survives_a_killed_actor(lively_model_dir, tmp_path):
    local = compare(lively_model_dir, tmp_path / "local")
    assert local.returncode == 0, local.stderr[-2000:]
    # each actor is killed as it is about to return its 3rd record; 2 replacements finish the run
    sharded = compare(lively_model_dir, tmp_path / "ray", failpoints="ray.solved=3", extra=RAY)
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    line = next(line for line in sharded.stdout.splitlines() if line.startswith("ray: "))
    lost = int(line.split(", ")[1].split()[0])
    rerun = int(line.split(", ")[2].split()[0])
    assert lost >= 1 and rerun >= lost, line  # an actor really died with work in flight
    expected = outcome(tmp_path / "local")
    assert any(r["l2_shift"] > 0 for r in expected["ttt"].values())  # the updates ran, in the actors too
    assert outcome(tmp_path / "ray") == expected  # every problem once, the same conversations
    summary = json.loads((tmp_path / "ray" / "summary.json").read_text())["methods"]
    assert summary["ttt"]["problems"] == 3 and (tmp_path / "ray" / "report.html").is_file()


def test_an_eval_on_ray_answers_as_a_local_eval(tiny_model_dir, tmp_path):
    def run(out, *extra):
        args = ["eval", "--split", "test", "--level", "1", "--limit", "4", "--model", str(tiny_model_dir),
                "--dtype", "float32", "--max-tokens", "8", "--threads", "2", "--no-progress", "--out", str(out), *extra]
        done = subprocess.run([sys.executable, "-c", CLI, *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=600)
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
