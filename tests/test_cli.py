import json

import pytest

from rosa2_dspy.cli import main

PROGRAM = "programs/math_solver.py"


def run(*args):
    return main(list(args))


@pytest.mark.parametrize("args,message", [
    (["--split", "nope"], "unknown split"),
    (["--split", "math500", "--subject", "Astrology"], "unknown subject"),
    (["--split", "math500", "--level", "7"], "unknown level"),
    (["--program", "missing.py"], "does not exist"),
    (["--program", f"{PROGRAM}:Nope"], "defines no 'Nope'"),
    (["--model", "/no/such/model", "--limit", "1"], "not found"),
    (["--limit", "-1"], "--limit must be >= 0"),
    (["--max-tokens", "-3"], "--max-tokens must be >= 1"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--temperature", "-0.5"], "--temperature must be >= 0"),
    (["--method", "rosa2", "--turns", "0"], "--turns must be >= 1"),
    (["--method", "ttt", "--max-shift", "0"], "--max-shift must be > 0"),
    (["--model", "no-such-model"], "not an embedded model"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    code = run("eval", "--out", str(tmp_path / "run"), *args)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("rosa2: error:") and message in err and "\n" not in err


BAD_INPUTS = [  # (command line, what the one-line error must say); {tmp}: a scratch folder
    ("eval --data {tmp}/nothere.jsonl", "does not exist"),
    ("eval --data {tmp}/empty.jsonl", "is empty"),
    ("eval --data {tmp}/torn.jsonl", "cannot read data file"),
    ("eval --data {tmp}/good.jsonl --input-field question", "input field 'question' not in the data"),
    ("eval --method nosuch", "unknown method 'nosuch'"),
    ("eval --method rosa2 --user nobody", "unknown --user 'nobody'"),
    ("eval --method {tmp}/missing.toml", "no session recipe"),
    ("eval --method {tmp}/bad.toml", "is not valid TOML"),
    ("eval --adapter nosuch", "unknown adapter 'nosuch'"),
    ("eval --ids nope/1.json", "no problems match"),
    ("eval --method pe --samples -1", "--samples must be >= 0"),
    ("eval --dtype float8", "unknown dtype 'float8'"),
    ("eval --device cpu --dtype float16 --prepack", "--prepack: float16 weights on cpu cannot be prepacked"),
    ("eval --compiled {tmp}", "not a compiled artifact"),
    ("eval --method pe --clarify", "--clarify is for a single pass"),
    ("compile --optimizer {tmp}/missing.toml --limit 2", "no recipe at"),
    ("compile --optimizer {tmp}/kind.toml --limit 2", "kind must be one of"),
    ("compile --optimizer optimizers/lora.toml --limit 0", "--limit must be given and >= 1"),
    ("bench compare --methods single,nosuch --limit 2", "unknown method 'nosuch'"),
    ("bench compare --methods single", "--limit must be given"),
    ("bench compare --methods single --limit 2 --user nobody", "unknown --user"),
    ("bench compare --methods single --limit 2 --learning-rate 0", "--learning-rate must be > 0, got 0.0"),
    ("bench compare --methods rosa2@lr=1 --limit 2", "a variant sets name=value among"),
    ("bench compare --methods rosa2@learning_rate=fast --limit 2", "learning_rate takes a float"),
    ("bench compare --methods rosa2@turns=2 --limit 2", "a variant sets name=value among"),
    ("bench compare --methods ttt@adapter_dtype=model --limit 2", "a variant sets name=value among"),
    ("bench compare --methods ttt --limit 2 --lora-layers 0", "layers must be >= 1"),
    ("bench compare --methods single,rosa2@update_steps=0 --limit 2", "steps must be >= 1"),
    ("bench compare --methods rosa2,pe --words-after first --limit 2", "pe: words_after=first needs a method"),
    ("bench compare --methods pe-then-ttt@words_after=first --limit 2", "pe-then-ttt: words_after=first needs"),
    ("eval --method pe --words-after first --limit 2", "pe: words_after=first needs a method that updates"),
    ("eval --method {tmp}/layers.toml", "layers.toml: lora_layers takes an int, got 14.5"),
    ("eval --method {tmp}/dtype.toml", "adapter_dtype must be one of float32, model, got 'half'"),
    ("eval --method {tmp}/child.toml", "child.toml: lora_layers takes an int, got 14.5"),  # from what it extends
    ("bench compare --methods ttt --limit 2 --compiled {tmp}/artifact --adapter-dtype model",
     "a compiled artifact with weights brings its own"),
    ("bench compare --methods ttt --limit 2 --compiled {tmp}/artifact --lora-layers 3",
     "--lora-layers and --adapter-dtype shape the engine's adapter"),
    ("bench compile --recipes {tmp}/missing.toml --limit 2", "no recipe at"),
    ("bench compile --recipes optimizers/lora.toml --limit 2 --split test --eval-split test",
     "seen by every compile here"),
    ("bench compile --recipes optimizers/lora.toml --limit 2 --val-limit -1", "--val-limit must be >= 0"),
]
NO_OUT = ("bench engine --concurrency 0", "--concurrency must be"), \
    ("bench engine --batch-sizes a,b", "--batch-sizes takes comma-separated integers"), \
    ("bench engine --repeats 0", "--repeats must be >= 1"), \
    ("bench update --rows 9", "--rows 1..8"), ("bench update --prompt-tokens 0", "--prompt-tokens must be >= 1"), \
    ("bench update --reply-tail 0", "--reply-tail must be >= 1"), \
    ("bench update --reply-tail 64 --objective sft", "with a preference objective"), \
    ("shards --show -1", "--show must be >= 0"), \
    ("shards --level 0", "unknown level 0")


@pytest.fixture()
def scratch(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "torn.jsonl").write_text('{"problem": "1+1", "answer": "2"}\n{"problem": "2+')
    (tmp_path / "good.jsonl").write_text('{"problem": "1+1", "answer": "2"}\n')
    (tmp_path / "bad.toml").write_text("[session]\nmethod = 'rosa2'\nturns = [\n")
    (tmp_path / "kind.toml").write_text("[optimizer]\nkind = 'nosuch'\n")
    (tmp_path / "layers.toml").write_text("[session]\nmethod = 'ttt'\nlora_layers = 14.5\n")
    (tmp_path / "dtype.toml").write_text("[session]\nmethod = 'ttt'\nadapter_dtype = 'half'\n")
    (tmp_path / "child.toml").write_text("extends = 'layers.toml'\n[session]\nturns = 2\n")
    artifact = tmp_path / "artifact"  # (its compile.json says it holds an adapter)
    artifact.mkdir()
    (artifact / "program.json").write_text("{}")
    (artifact / "compile.json").write_text('{"program": "programs/math_solver.py", "adapter": "adapter"}')
    existing = tmp_path / "existing"  # a run folder from before: a bad command must leave it byte for byte
    existing.mkdir()
    (existing / "config.json").write_text('{"command": "eval", "split": "math500"}\n')
    (existing / "results.jsonl").write_text('{"unique_id": "a", "correct": true}\n')
    return tmp_path


def _tree(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("line,message", [*BAD_INPUTS, *NO_OUT], ids=lambda v: v if " " in str(v) else "")
def test_bad_input_table_one_line_exit_2_and_no_run_folder_touched(scratch, capsys, line, message):
    argv = line.format(tmp=scratch).split()
    takes_out = (line, message) not in NO_OUT
    fresh = scratch / "fresh"
    assert run(*argv, *(["--out", str(fresh)] if takes_out else [])) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rosa2: error:") and message in err and "\n" not in err, err
    assert not fresh.exists()  # refused before anything was written
    if takes_out:
        before = _tree(scratch / "existing")
        assert run(*argv, "--out", str(scratch / "existing")) == 2
        assert capsys.readouterr().err.count("\n") == 1
        assert _tree(scratch / "existing") == before


def test_unwritable_output_folder(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert run("eval", "--limit", "1", "--out", str(blocker / "run")) == 2
    assert "not writable" in capsys.readouterr().err


def test_empty_data_file_is_refused_in_one_line(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert run("eval", "--data", str(empty), "--out", str(tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert err.startswith("rosa2: error: data file") and "is empty" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_malformed_data_file_is_refused(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1+1", "answer": "2"}\n{"problem": "2+')
    assert run("eval", "--data", str(bad), "--out", str(tmp_path / "run")) == 2
    assert "cannot read data file" in capsys.readouterr().err


def test_eval_writes_results_resumes_and_repairs_a_torn_line(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "run"
    common = ["eval", "--program", PROGRAM, "--split", "math500", "--limit", "3", "--model", str(tiny_model_dir),
              "--max-tokens", "8", "--threads", "2", "--no-progress", "--out", str(out)]
    assert run(*common) == 0
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 3
    record = json.loads(lines[0])
    for key in ("unique_id", "prediction", "gold", "correct", "strict", "boxed", "input_tokens", "output_tokens",
                "seconds", "parse_error"):
        assert key in record
    summary = json.loads((out / "summary.json").read_text())
    assert summary["problems"] == 3 and 0 <= summary["parse_failure_rate"] <= 1 and summary["grade_fallbacks"] == 0
    # a killed run leaves a torn last line: it is dropped, that problem runs again, the rest is kept
    kept = lines[:2]
    (out / "results.jsonl").write_text("\n".join(kept) + "\n" + lines[2][: len(lines[2]) // 2])
    assert run(*common) == 0
    after = (out / "results.jsonl").read_text().splitlines()
    assert after[:2] == kept and len(after) == 3
    assert "resuming: 2 of 3" in capsys.readouterr().out
    # extending the limit resumes too; other settings are refused instead of mixing runs
    assert run(*[a if a != "3" else "4" for a in common]) == 0
    assert len((out / "results.jsonl").read_text().splitlines()) == 4
    assert run(*common[:-1], str(out), "--seed", "9") == 2
    assert run(*common, "--no-shuffle") == 2 and "shuffle: True -> False" in capsys.readouterr().err
    # the precision is part of a run (`auto` resolves per machine): another one is refused before any answer
    other = "bfloat16" if json.loads((out / "config.json").read_text())["dtype"] == "float32" else "float32"
    assert run(*common, "--dtype", other) == 2 and f"-> '{other}'" in capsys.readouterr().err
    # a smaller limit reports only its problems, and no throughput: this invocation generated nothing
    assert run(*common) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["problems"] == 3 and "tokens_per_second" not in summary and "seconds_per_problem" not in summary


def test_a_float32_run_records_its_weights_packing_and_an_older_folder_resumes_only_plain(tmp_path, tiny_model_dir,
                                                                                          capsys):
    """Packed float32 weights (the default since session 30) round differently from plain ones: a run folder
    refuses the other setting, a folder from before the key existed (plain weights) resumes with --no-prepack only,
    and a later default run in the same process is served packed again, as its identity says."""
    import torch

    from rosa2_dspy.engine import LocalEngine
    from rosa2_dspy.engine.prepack import supported

    if not supported("cpu", torch.float32):
        pytest.skip("this PyTorch has no oneDNN")
    out = tmp_path / "run"
    common = ["eval", "--program", PROGRAM, "--split", "math500", "--limit", "2", "--model", str(tiny_model_dir),
              "--device", "cpu", "--dtype", "float32", "--max-tokens", "4", "--threads", "2", "--no-progress",
              "--out", str(out)]
    assert run(*common) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["prepack"] is True
    assert run(*common, "--no-prepack") == 2 and "prepack: True -> False" in capsys.readouterr().err
    del config["prepack"]
    (out / "config.json").write_text(json.dumps(config))
    assert run(*common) == 2 and "prepack: False -> True" in capsys.readouterr().err
    assert run(*common, "--no-prepack") == 0
    assert json.loads((out / "config.json").read_text())["prepack"] is False
    engine = LocalEngine.shared(str(tiny_model_dir), device="cpu", dtype="float32")
    assert not engine.prepacked
    assert run(*common[:-1], str(tmp_path / "again")) == 0
    assert engine.prepacked and json.loads((tmp_path / "again" / "config.json").read_text())["prepack"] is True


def test_info_prints_versions_and_precision(capsys):
    assert run("info") == 0
    text = capsys.readouterr().out
    from rosa2_dspy import models

    expected = str(models.pick_dtype(models.pick_device())).replace("torch.", "")
    assert "dspy" in text and "precision" in text and expected in text


def test_bench_engine_prints_json_with_every_measurement(tiny_model_dir, capsys):
    assert run("bench", "engine", "--model", str(tiny_model_dir), "--max-tokens", "4", "--concurrency", "2") == 0
    report = json.loads(capsys.readouterr().out)
    for key in ("a_raw_batch1", "b_engine_sequential", "c_engine_concurrent_dspy", "d_raw_batch8"):
        assert report[key]["tokens"] > 0 and report[key]["tokens_per_s"] > 0
    assert report["greedy_identical_batched_vs_sequential"] is True
    assert report["bandwidth_bound_batch1_tokens_per_s"] > 0 and report["peak_rss_mib"] > 0
    assert set(report["targets"]) == {"b_ge_0.95a", "c_ge_2.5a"}


def test_bench_engine_reports_the_roofline_per_batch_size(tiny_model_dir, capsys):
    assert run("bench", "engine", "--model", str(tiny_model_dir), "--max-tokens", "4", "--concurrency", "2",
               "--batch-sizes", "1,3", "--repeats", "2") == 0
    roof = json.loads(capsys.readouterr().out)["roofline"]
    assert set(roof["batches"]) == {"1", "3"} and roof["copy_bandwidth_gb_s"] > 0 and roof["matmul_gflop_s"] > 0
    for size, row in roof["batches"].items():
        step = max(roof["weight_bytes_per_step"] / (roof["copy_bandwidth_gb_s"] * 1e9),
                   int(size) * roof["flop_per_token"] / (roof["matmul_gflop_s"] * 1e9))
        assert row["roofline_tokens_per_s"] == pytest.approx(int(size) / step, rel=0.02)
        assert row["roofline_fraction"] == pytest.approx(row["decode_tokens_per_s"] / row["roofline_tokens_per_s"],
                                                         rel=0.02, abs=0.0006)  # reported to 3 decimals
        assert row["prefill_tokens_per_s"] > 0 and row["bound"] in ("memory", "compute")
        # every run is kept, and the fastest one is the figure (a shared host only ever slows a run down)
        assert len(row["step_ms_runs"]) == 2 and row["step_ms"] == min(row["step_ms_runs"])
        # (the step is reported to 0.1 ms, which at the tiny model's 2-3 ms a step is a few percent)
        assert 1000 * int(size) / row["decode_tokens_per_s"] == pytest.approx(row["step_ms"], abs=0.06)
        # the engine's own decoder, timed in the same rounds, against the same roofline
        assert len(row["served_step_ms_runs"]) == 2 and row["served_step_ms"] == min(row["served_step_ms_runs"]) > 0
        assert row["served_roofline_fraction"] == pytest.approx(
            int(size) / (row["served_step_ms"] / 1000) / row["roofline_tokens_per_s"], rel=0.05)
    assert run("bench", "engine", "--batch-sizes", "8,many") == 2
    assert "--batch-sizes takes comma-separated integers" in capsys.readouterr().err


def test_bench_roofline_turns_the_order_of_its_paths_round_each_round(tiny_engine, monkeypatch):
    """The engine's decoder and raw generate are timed in the same rounds; neither always goes first."""
    import torch
    from rosa2_dspy import bench

    calls = []
    monkeypatch.setattr(bench, "copy_bandwidth_gbs", lambda: 10.0)
    monkeypatch.setattr(bench, "matmul_gflops", lambda dtype: 100.0)
    monkeypatch.setattr(bench, "continuous_step_seconds",
                        lambda engine, rows, idents, steps: calls.append("decoder") or 0.01)
    monkeypatch.setattr(bench, "prefill_and_step", lambda engine, batch, steps: calls.append(
        "packed" if engine.prepacked else "plain") or (0.1, 0.01, torch.zeros(1)))
    bench.bench_roofline(tiny_engine, [[1, 2, 3]], [1], max_tokens=3, repeats=2)
    rounds = [calls[:len(calls) // 2], calls[len(calls) // 2:]]
    assert all(sorted(r) == sorted(rounds[0]) and "decoder" in r for r in rounds)
    assert rounds[0][0] == "decoder" and rounds[1][-1] == "decoder"
    assert rounds[1] == rounds[0][::-1]


def test_decode_cost_counts_each_weight_once_and_the_embedding_only_when_tied(tiny_engine):
    import torch

    from rosa2_dspy.bench import decode_cost

    model = tiny_engine.model  # hidden 64, MLP 128, 2 layers, 2 KV heads of 16, tied embedding
    vocab = model.config.vocab_size
    per_layer = 64 * 64 + 2 * (64 * 32) + 64 * 64 + 3 * (64 * 128)
    norms = 2 * 2 * 64 + 64
    assert decode_cost(model) == (4 * (2 * per_layer + norms + vocab * 64), 2 * (2 * per_layer + vocab * 64))
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    read, flops = decode_cost(model)
    assert (read, flops) == (4 * (2 * per_layer + norms + vocab * 64), 2 * (2 * per_layer + vocab * 64))


def test_bench_engine_serves_the_weights_it_is_asked_for_and_times_the_other_setting_beside(tiny_model_dir, capsys):
    """``--prepack`` / ``--no-prepack``: the engine's figures (greedy equality included) come from that setting, the
    roofline times the other one beside it (in float32 here)."""
    import torch

    from rosa2_dspy.engine.prepack import supported

    if not supported("cpu", torch.float32):
        pytest.skip("this PyTorch has no oneDNN")
    for flag, served, other in (("--prepack", True, "unpacked"), ("--no-prepack", False, "prepacked")):
        assert run("bench", "engine", "--model", str(tiny_model_dir), "--max-tokens", "4", "--concurrency", "2",
                   "--batch-sizes", "2", "--repeats", "1", flag) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["prepacked"] is served and report["roofline"]["prepacked"] is served
        assert report["greedy_identical_batched_vs_sequential"] is True
        assert report["roofline"]["batches"]["2"][f"{other}_step_ms"] > 0


def test_bench_engine_mixed_weights_matches_peft_and_leaves_the_engine_clean(tiny_model_dir, capsys):
    from rosa2_dspy.engine import LocalEngine

    assert run("bench", "engine", "--model", str(tiny_model_dir), "--max-tokens", "3", "--concurrency", "2",
               "--mixed-weights", "3") == 0
    mixed = json.loads(capsys.readouterr().out)["mixed_weights"]
    assert mixed["adapters"] == 3 and mixed["rows"] == 6 and mixed["same_tokens_as_peft"] is True
    assert mixed["engine_per_row_tokens_per_s"] > 0 and mixed["peft_adapter_names_tokens_per_s"] > 0
    assert min(mixed["continuous_decode_step_ms"].values()) > 0 and mixed["continuous_per_row_over_one_adapter"] > 0
    engine = LocalEngine.shared(str(tiny_model_dir))
    assert list(engine.peft_model.peft_config) == ["default"] and not engine._pins
    assert run("bench", "engine", "--mixed-weights", "40") == 2
    assert "--mixed-weights must be 0..16" in capsys.readouterr().err


def _tiny_recipe(tmp_path, text: str):
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    return str(path)


LORA_RECIPE = """
[optimizer]
kind = "lora"
sources = ["bootstrap", "solutions"]
[update]
objective = "sft"
steps = 2
batch_size = 2
learning_rate = 1e-2
max_length = 256
"""


def test_compile_lora_then_eval_compiled(tmp_path, tiny_model_dir, capsys):
    import shutil

    from rosa2_dspy.engine import LocalEngine

    model = tmp_path / "model"  # its own engine: the shared tiny one stays untouched for other tests
    shutil.copytree(tiny_model_dir, model)
    artifact = tmp_path / "artifacts" / "lora"
    assert run("compile", "--program", PROGRAM, "--optimizer", _tiny_recipe(tmp_path, LORA_RECIPE), "--split",
               "train", "--level", "1", "--limit", "2", "--model", str(model), "--max-tokens", "8", "--threads", "2",
               "--out", str(artifact)) == 0
    meta = json.loads((artifact / "compile.json").read_text())
    assert (artifact / "adapter" / "adapter_model.safetensors").is_file() and (artifact / "program.json").is_file()
    assert meta["history"][0]["solution_rows"] == 2 and meta["adapter_l2_shift"] > 0
    assert len(meta["train_ids"]) == 2
    LocalEngine.shared(str(model)).reset_adapter()  # eval --compiled must bring the adapter back
    out = tmp_path / "run"
    assert run("eval", "--compiled", str(artifact), "--split", "test", "--limit", "2", "--max-tokens", "8",
               "--threads", "2", "--no-progress", "--out", str(out)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["adapter_l2_shift"] == pytest.approx(meta["adapter_l2_shift"], rel=1e-5)
    assert summary["instructions"] == meta["instructions"] and summary["compile_overlap"] == 0
    assert "rosa2 eval --compiled" in capsys.readouterr().out
    assert LocalEngine.shared(str(model)).pin_holds() == {}  # compile and eval let go of every pin
    # the problems the compile trained on: refused, untouched folder, unless --allow-overlap
    seen = ["eval", "--compiled", str(artifact), "--split", "train", "--ids", ",".join(meta["train_ids"]),
            "--max-tokens", "8", "--no-progress", "--out", str(tmp_path / "seen")]
    assert run(*seen) == 2 and not (tmp_path / "seen").exists()
    assert "2 of the 2 problems were seen by the compile" in capsys.readouterr().err
    assert run(*seen, "--allow-overlap") == 0
    assert json.loads((tmp_path / "seen" / "summary.json").read_text())["compile_overlap"] == 2


BT_RECIPE = """
[optimizer]
kind = "better-together"
p = "words"
keep = "boxed"
strategy = "p -> w"
valset_ratio = 0.0
[optimizer.p_settings]
rounds = 1
[update]
objective = "sft"
steps = 1
batch_size = 2
[critic]
model = "engine"
"""


def test_better_together_reports_the_step_dspy_gave_up_on(tmp_path, tiny_model_dir, capsys):
    """DSPy's BetterTogether logs a failed step and returns the best program so far; the compile says so."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    artifact = tmp_path / "bt"
    assert run("compile", "--program", PROGRAM, "--optimizer", _tiny_recipe(tmp_path, BT_RECIPE), "--split", "train",
               "--level", "1", "--limit", "2", "--model", str(model), "--max-tokens", "8", "--threads", "2",
               "--out", str(artifact)) == 0
    meta = json.loads((artifact / "compile.json").read_text())
    strategies = [h["strategy"] for h in meta["history"]]
    assert "original" in strategies and "p" in strategies and "p -> w" not in strategies
    # the random tiny model boxes nothing, so BootstrapFinetune has no trace to train on
    assert any("no training data" in m for m in meta["dspy_errors"]) and meta["adapter_l2_shift"] == 0.0
    assert "recipe: DSPy reported:" in capsys.readouterr().err


@pytest.mark.parametrize("text,message", [
    ("[optimizer]\nkind = 'magic'\n", "kind must be one of"),
    ("[optimizer\nkind = 'lora'", "not valid TOML"),
    ("[optimizer]\nkind = 'lora'\n[update]\nlr = 1\n", "unknown update setting"),
    ("[optimizer]\nkind = 'lora'\nwarp = 9\n", "warp"),
])
def test_bad_recipe_is_one_line_and_writes_nothing(tmp_path, tiny_model_dir, capsys, text, message):
    artifact = tmp_path / "artifact"
    code = run("compile", "--optimizer", _tiny_recipe(tmp_path, text), "--limit", "1", "--model",
               str(tiny_model_dir), "--out", str(artifact))
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and "\n" not in err
    assert not artifact.exists()


def test_eval_compiled_refuses_a_folder_that_is_not_an_artifact(tmp_path, capsys):
    assert run("eval", "--compiled", str(tmp_path), "--limit", "1", "--out", str(tmp_path / "run")) == 2
    assert "not a compiled artifact" in capsys.readouterr().err


def test_bench_update_prints_json(tiny_model_dir, capsys):
    assert run("bench", "update", "--model", str(tiny_model_dir), "--steps", "1", "--batch-size", "2",
               "--updates", "2") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["trl_total_seconds_per_update"] > 0 and report["raw_seconds_per_update"] > 0
    assert report["l2_shift_per_update"] > 0 and report["trl_over_raw"] > 0
    assert report["construction_seconds_first_update"] > 0 and report["prepare_seconds_per_update"] > 0
    answer = report["answer_generation"]  # one row's share of a batched 1024-token answer, in the same run
    assert answer["batch"] == 16 and answer["tokens"] == 1024 and answer["step_ms"] > 0
    assert answer["seconds_per_row"] == pytest.approx(
        (answer["prefill_seconds"] + 1023 * answer["step_ms"] / 1000) / 16, rel=0.01)
    assert report["update_over_generation"] == pytest.approx(
        report["trl_total_seconds_per_update"] / answer["seconds_per_row"], rel=0.01)
    assert 0 < report["update_peak_rss_mib"] <= report["peak_rss_mib"] and not report["activation_checkpointing"]
    import torch

    from rosa2_dspy.engine.prepack import default_for

    assert report["prepacked"] == default_for("cpu", getattr(torch, report["dtype"]))
    # activation checkpointing, and plain weights: the same updates (the same shift to the last digit)
    assert run("bench", "update", "--model", str(tiny_model_dir), "--steps", "1", "--batch-size", "2",
               "--updates", "2", "--answer-batch", "0", "--activation-checkpointing", "--no-prepack") == 0
    checkpointed = json.loads(capsys.readouterr().out)
    assert checkpointed["activation_checkpointing"] is True and checkpointed["prepacked"] is False
    # (in float32 plain weights round differently from the default packed ones: the same update to ~1e-5)
    assert checkpointed["l2_shift_per_update"] == (report["l2_shift_per_update"] if report["dtype"] != "float32"
                                                   else pytest.approx(report["l2_shift_per_update"], rel=1e-4))
    # a frozen prompt: another update (no gradient through the prompt), reported as such, no raw loop to compare
    assert run("bench", "update", "--model", str(tiny_model_dir), "--steps", "1", "--batch-size", "2",
               "--updates", "2", "--answer-batch", "0", "--frozen-prompt") == 0
    frozen = json.loads(capsys.readouterr().out)
    assert frozen["frozen_prompt"] is True and "trl_over_raw" not in frozen
    assert 0 < frozen["l2_shift_per_update"] != report["l2_shift_per_update"]
    # rows of a later turn's prompt length, scored on their replies' last tokens: another update again
    common = ("bench", "update", "--model", str(tiny_model_dir), "--objective", "apo_zero_unpaired", "--steps", "1",
              "--batch-size", "2", "--updates", "2", "--answer-batch", "0", "--frozen-prompt", "--prompt-tokens",
              "300", "--completion-tokens", "120")
    assert run(*common) == 0
    whole = json.loads(capsys.readouterr().out)
    assert run(*common, "--reply-tail", "16") == 0
    tail = json.loads(capsys.readouterr().out)
    assert (whole["reply_tail"], tail["reply_tail"]) == (None, 16)
    assert 295 <= tail["prompt_tokens_per_row"] == whole["prompt_tokens_per_row"] <= 305
    assert 0 < tail["l2_shift_per_update"] != whole["l2_shift_per_update"]


def test_bench_update_rows_of_a_long_replys_length(tiny_model_dir):
    """--completion-tokens N: each row's target is N tokens long (a comparison's rejected replies run to 1,024)."""
    from transformers import AutoTokenizer

    from rosa2_dspy.bench_update import _update_rows

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    as_written = _update_rows(limit=3)
    rows = _update_rows(limit=3, completion_tokens=700, tokenizer=tokenizer)
    lengths = [len(tokenizer.encode(r["completion"], add_special_tokens=False)) for r in rows]
    assert all(abs(n - 700) <= 5 for n in lengths), lengths  # (decoding and encoding again may merge a few)
    for long, short in zip(rows, as_written):
        assert long["prompt"] == short["prompt"] and long["completion"].startswith(short["completion"][:200])
    # --prompt-tokens N: the problem repeated in the user's message until the chat prompt is about N tokens
    longer = _update_rows(limit=3, tokenizer=tokenizer, prompt_tokens=400)
    for long, short in zip(longer, as_written):
        n = len(tokenizer.apply_chat_template(long["prompt"], tokenize=True, add_generation_prompt=True,
                                              return_dict=True)["input_ids"])
        assert abs(n - 400) <= 5, n
        assert long["prompt"][0] == short["prompt"][0] and long["completion"] == short["completion"]
        problem = short["prompt"][1]["content"].split("\n\n")[0]
        assert long["prompt"][1]["content"].startswith(problem + "\n\n" + problem[:20])


def test_bench_update_with_one_row_trains_a_batch_of_one_except_kto(tiny_model_dir, capsys):
    for objective, batch in (("apo_zero_unpaired", 1), ("kto", 2)):
        assert run("bench", "update", "--model", str(tiny_model_dir), "--objective", objective, "--rows", "1",
                   "--steps", "1", "--batch-size", "2", "--updates", "2", "--answer-batch", "0") == 0
        report = json.loads(capsys.readouterr().out)
        assert report["rows"] == 1 and report["trainer_batch_size"] == batch and report["l2_shift_per_update"] > 0
    assert run("bench", "update", "--model", str(tiny_model_dir), "--rows", "0") == 2
    assert "--rows 1..8" in capsys.readouterr().err
    # the adapter on the last block only, in the model's own dtype: the levers issue 14 names, measured the same way
    assert run("bench", "update", "--model", str(tiny_model_dir), "--objective", "apo_zero_unpaired", "--rows", "1",
               "--steps", "1", "--batch-size", "2", "--updates", "2", "--answer-batch", "0", "--layers", "1",
               "--adapter-dtype", "model") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["adapted_blocks"] == 1 and report["adapter_dtype"] == report["dtype"]
    assert report["l2_shift_per_update"] > 0
    assert run("bench", "update", "--model", str(tiny_model_dir), "--layers", "0") == 2
    assert "--layers must be >= 1" in capsys.readouterr().err


def test_progress_in_a_log_is_plain_lines_with_accuracy_and_eta(tmp_path, capsys):
    import dspy

    from rosa2_dspy.evaluation import ResultsFile, progress_line, run_items

    items = [dspy.Example(unique_id=f"p{i}") for i in range(3)]
    results = ResultsFile(tmp_path / "results.jsonl")
    run_items(items, lambda e: {"unique_id": e.unique_id, "solved": e.unique_id != "p1"}, results, description="pe")
    err = capsys.readouterr().err  # not a terminal: no live bar, one closing line
    assert err.strip().splitlines()[-1].startswith("pe: 3/3 done, acc 67%, elapsed 0:00:0")
    assert progress_line("rosa2", 10, 40, 5, 600.0) == "rosa2: 10/40 done, acc 50%, elapsed 0:10:00, ETA 0:30:00"
    assert len(results.records) == 3


def _subcommands(parser, path=()):
    """(command path, parser) for every runnable subcommand of ``rosa2``."""
    import argparse

    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
    for action in subs:
        for name, sub in action.choices.items():
            yield from _subcommands(sub, (*path, name))


def test_every_flag_of_every_command_says_what_it_does():
    """`rosa2 <command> --help` is the user's reference: a flag without a help line is a flag nobody can use
    without reading the code."""
    from rosa2_dspy.cli.parser import build_parser

    commands = dict(_subcommands(build_parser()))
    assert {("eval",), ("compile",), ("bench", "compare"), ("bench", "compile"), ("report",)} <= set(commands)
    silent = [f"rosa2 {' '.join(path)} {action.option_strings[0] if action.option_strings else action.dest}"
              for path, parser in commands.items() for action in parser._actions
              if action.help in (None, "") and action.dest != "help"]
    assert silent == []
