"""LoRA updates through TRL on a tiny model: objectives, shift, trust region, rollback, persistence, DSPy hooks."""

from __future__ import annotations

import contextlib
import math

import dspy
import pytest
import torch

from conftest import make_tiny_model
from rosa2_dspy.adapters import BoxedAdapter
from rosa2_dspy.engine import GenSettings, LocalEngine
from rosa2_dspy.weights import (LoRAFinetune, LoRAUpdater, UpdateConfig, UpdateError, kto_row, local_finetunable_lm,
                                sequence_logprob, sft_row)

PROMPT = [{"role": "user", "content": "What is 2+3?"}]
GOOD = "2+3=5. \\boxed{5}"
BAD = "I think it is 7 or so"


def fast(**overrides) -> UpdateConfig:
    values = dict(objective="sft", steps=4, batch_size=2, learning_rate=1e-2, max_length=128)
    values.update(overrides)
    return UpdateConfig(**values)


def same_state(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_sft_raises_the_likelihood_of_its_targets(tiny_engine):
    updater = LoRAUpdater(tiny_engine, fast())
    before = sequence_logprob(tiny_engine, PROMPT, GOOD)
    result = updater.update([sft_row(PROMPT, GOOD)])
    after = sequence_logprob(tiny_engine, PROMPT, GOOD)
    assert result.steps == 4 and not result.rolled_back and len(result.losses) == 4
    assert after > before + 1.0
    assert result.losses[-1] < result.losses[0]


def test_compile_time_training_reports_its_progress_and_session_updates_stay_quiet(tiny_engine, capsys):
    updater = LoRAUpdater(tiny_engine, fast(steps=3), progress=True)  # as LoRAFinetune and the provider make it
    result = updater.update([sft_row(PROMPT, GOOD)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("weights: optimizer steps: 3/3 done, elapsed 0:00:")
    assert lines[-1].endswith(f"ETA 0:00:00 (loss {result.losses[-1]:.4g})")
    updater.config = fast(steps=1)
    updater.update([sft_row(PROMPT, GOOD)])
    assert "optimizer steps" not in capsys.readouterr().err  # one step: nothing to follow
    LoRAUpdater(tiny_engine, fast(steps=3)).update([sft_row(PROMPT, GOOD)])  # a session's (rosa2@update_steps=3)
    assert "optimizer steps" not in capsys.readouterr().err


def test_kto_lowers_undesirable_relative_to_desirable(tiny_engine):
    updater = LoRAUpdater(tiny_engine, fast(objective="kto", beta=0.5, steps=6))
    margin_before = sequence_logprob(tiny_engine, PROMPT, GOOD) - sequence_logprob(tiny_engine, PROMPT, BAD)
    result = updater.update([kto_row(PROMPT, GOOD, True), kto_row(PROMPT, BAD, False)])
    margin_after = sequence_logprob(tiny_engine, PROMPT, GOOD) - sequence_logprob(tiny_engine, PROMPT, BAD)
    assert not result.rolled_back
    assert margin_after > margin_before + 0.5
    # the reference is the adapter-disabled base: no second adapter is left behind
    assert list(tiny_engine.peft_model.peft_config) == ["default"]


def test_apo_zero_unpaired_lowers_a_lone_rejected_reply_without_repeating_it(tiny_engine, monkeypatch):
    """ROSA's failure-only update: one rejected reply, no desirable one. apo_zero_unpaired runs on TRL's
    KTOTrainer without the KL reference point, so the lone row trains once per step, not twice."""
    updater = LoRAUpdater(tiny_engine, fast(objective="apo_zero_unpaired", beta=0.5, steps=3, batch_size=2))
    seen = []
    original = updater._trainer
    monkeypatch.setattr(updater, "_trainer", lambda objective, dataset, size: (
        seen.append((len(dataset), size)), original(objective, dataset, size))[1])
    before = sequence_logprob(tiny_engine, PROMPT, BAD)
    result = updater.update([kto_row(PROMPT, BAD, False)])
    after = sequence_logprob(tiny_engine, PROMPT, BAD)
    trainer = updater._trainers["apo_zero_unpaired"]
    assert seen == [(1, 1)] and trainer.args.per_device_train_batch_size == 1
    assert trainer.calculate_KL is False and trainer.loss_type == "apo_zero_unpaired"
    assert result.losses[0] == pytest.approx(0.5, abs=1e-4)  # sigmoid(beta * 0): the policy starts at the reference
    assert after < before - 0.5 and not result.rolled_back
    # a batch holds up to batch_size rows, never more than there are: a turn's rows share one step
    updater.config.batch_size = 4
    updater.update([kto_row(PROMPT, BAD, False), kto_row(PROMPT, "no idea", False), kto_row(PROMPT, GOOD, True)])
    assert seen[-1] == (3, 3)
    # KTO takes at least 2 rows (its KL estimate pairs completions across rows), so a lone row is repeated once
    updater.update([kto_row(PROMPT, BAD, False)], objective="kto")
    assert seen[-1] == (2, 2)


def test_dpo_prefers_chosen(tiny_engine):
    from rosa2_dspy.weights import dpo_row

    updater = LoRAUpdater(tiny_engine, fast(objective="dpo", beta=0.5))
    margin_before = sequence_logprob(tiny_engine, PROMPT, GOOD) - sequence_logprob(tiny_engine, PROMPT, BAD)
    updater.update([dpo_row(PROMPT, GOOD, BAD)])
    margin_after = sequence_logprob(tiny_engine, PROMPT, GOOD) - sequence_logprob(tiny_engine, PROMPT, BAD)
    assert margin_after > margin_before


def test_shift_is_zero_after_reset_and_grows_with_updates(tiny_engine):
    updater = LoRAUpdater(tiny_engine, fast(steps=2))
    assert updater.shift().total == 0.0
    first = updater.update([sft_row(PROMPT, GOOD)])
    one = updater.shift()
    updater.update([sft_row(PROMPT, GOOD)])
    two = updater.shift()
    assert 0 < one.total < two.total
    assert first.shift_after == pytest.approx(one.total)
    assert math.isclose(math.sqrt(sum(v * v for v in two.modules.values())), two.total, rel_tol=1e-9)
    # the factor formula equals the explicit ||s B A||_F of one module
    name, value = next(iter(two.modules.items()))
    module = dict(tiny_engine.peft_model.named_modules())[name]
    with torch.no_grad():
        explicit = (module.scaling["default"] * module.lora_B["default"].weight @ module.lora_A["default"].weight).norm()
    assert value == pytest.approx(float(explicit), rel=1e-4)
    updater.reset()
    assert updater.shift().total == 0.0


def test_trust_region_bounds_each_update_and_the_session(tiny_engine):
    updater = LoRAUpdater(tiny_engine, fast(max_shift_per_update=0.05, max_shift_per_session=0.08))
    first = updater.update([sft_row(PROMPT, GOOD)])
    assert first.scaled_by < 1.0 and "trust region" in first.reason
    assert first.update_shift == pytest.approx(0.05, rel=1e-3)
    second = updater.update([sft_row(PROMPT, GOOD)])
    assert second.update_shift <= 0.05 * (1 + 1e-3)
    assert updater.session_shift() == pytest.approx(0.08, rel=1e-3)
    third = updater.update([sft_row(PROMPT, GOOD)])
    assert updater.session_shift() <= 0.08 * (1 + 1e-3) and third.update_shift < 1e-3


@pytest.mark.parametrize("objective", ["sft", "kto", "apo_zero_unpaired"])
def test_nan_loss_rolls_back_bit_identical(tiny_engine, monkeypatch, objective):
    updater = LoRAUpdater(tiny_engine, fast(objective=objective, steps=2))
    rows = [kto_row(PROMPT, GOOD, True), kto_row(PROMPT, BAD, False)]
    updater.update(rows)  # a non-trivial adapter to roll back to
    before = tiny_engine.snapshot()
    trainer = updater._trainers[objective]
    real_loss = trainer.compute_loss
    calls = {"n": 0}

    def loss_turns_nan(*args, **kwargs):
        calls["n"] += 1
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if calls["n"] >= 2 else loss

    monkeypatch.setattr(trainer, "compute_loss", loss_turns_nan)
    updater.config = fast(objective=objective, steps=4)
    result = updater.update(rows)
    assert result.rolled_back and "non-finite" in result.reason
    assert result.steps == 2  # training stopped at the first non-finite loss
    assert same_state(before, tiny_engine.snapshot())


def test_interrupt_mid_update_restores_the_weights(tiny_engine, monkeypatch):
    updater = LoRAUpdater(tiny_engine, fast(steps=3))
    updater.update([sft_row(PROMPT, GOOD)])
    before = tiny_engine.snapshot()
    trainer = updater._trainers["sft"]
    real_step = trainer.training_step
    calls = {"n": 0}

    def step_then_interrupt(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer, "training_step", step_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        updater.update([sft_row(PROMPT, "something else entirely")])
    assert calls["n"] == 2
    assert same_state(before, tiny_engine.snapshot())


def test_free_heap_is_handed_back_before_and_after_every_update_counted_once(tiny_engine, monkeypatch):
    """An update trims the C heap before it starts (decode's freed memory: a lower base for its peak) and after it
    ends (its own activations), also when interrupted; an update inside an update (a session's turn around the
    updater's step) is one update, with one trim on each side."""
    from rosa2_dspy.engine import scheduler

    trims = []
    monkeypatch.setattr(scheduler, "release_free_heap", lambda: trims.append(1) or 3.0)
    updates, trims_before = tiny_engine.stats["updates"], tiny_engine.stats["heap_trims"]
    updater = LoRAUpdater(tiny_engine, fast(steps=1))
    with tiny_engine.updating():
        updater.update([sft_row(PROMPT, GOOD)])
    assert len(trims) == 2 and tiny_engine.stats["updates"] == updates + 1
    monkeypatch.setattr(updater._trainers["sft"], "training_step", lambda *a, **k: (_ for _ in ()).throw(
        KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        updater.update([sft_row(PROMPT, GOOD)])
    assert len(trims) == 4 and tiny_engine.stats["updates"] == updates + 2
    assert tiny_engine.stats["heap_trims"] == trims_before + 4


def test_bad_rows_and_settings_are_refused(tiny_engine):
    updater = LoRAUpdater(tiny_engine, fast())
    with pytest.raises(UpdateError, match="desirable"):
        updater.update([kto_row(PROMPT, BAD, False)], objective="sft")
    with pytest.raises(UpdateError, match="objective"):
        UpdateConfig(objective="ppo")
    with pytest.raises(UpdateError, match="unknown update setting"):
        UpdateConfig.from_dict({"lr": 1})


def test_precision_follows_the_device(tiny_engine):
    updater = LoRAUpdater(tiny_engine, fast())
    args = updater._training_args("kto", 2)
    assert args.bf16 is False and args.fp16 is False  # fp32 on this CPU, never TRL's bf16 default
    assert args.gradient_checkpointing is False


def test_save_and_load_round_trip(tiny_engine, tokenizer, tmp_path):
    updater = LoRAUpdater(tiny_engine, fast(steps=2))
    updater.update([sft_row(PROMPT, GOOD)])
    tiny_engine.save_adapter(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    other = LocalEngine(make_tiny_model(tokenizer), tokenizer, name="tiny")
    other.load_adapter(tmp_path / "adapter")
    assert same_state(tiny_engine.snapshot(), other.snapshot())
    assert other.weights_id == tiny_engine.weights_id
    settings = GenSettings(max_tokens=8, do_sample=False, temperature=0.0, top_p=None, top_k=None, seed=None)
    assert other.generate_one(PROMPT, settings).text == tiny_engine.generate_one(PROMPT, settings).text


def test_pinned_lm_keeps_its_weights(tiny_engine):
    updater = LoRAUpdater(tiny_engine, fast(steps=2))
    updater.update([sft_row(PROMPT, GOOD)])
    pinned = tiny_engine.lm(pinned=True, max_tokens=8, cache=False)
    answer = pinned(messages=PROMPT)[0]
    kept = tiny_engine.weights_id
    updater.update([sft_row(PROMPT, "another target text")])
    assert tiny_engine.weights_id != kept
    assert pinned(messages=PROMPT)[0] == answer
    assert tiny_engine.weights_id == kept  # the engine switched back for the pinned request


class Reply(dspy.Signature):
    """Reply to the question."""

    question: str = dspy.InputField()
    reply: str = dspy.OutputField()


def _program(lm):
    program = dspy.Predict(Reply)
    program.set_lm(lm)
    return program


def _trainset():
    return [dspy.Example(question=f"What is {i}+{i}?", reply=str(2 * i)).with_inputs("question") for i in range(4)]


def test_bootstrap_finetune_trains_through_our_provider(tiny_engine):
    lm = local_finetunable_lm(tiny_engine, fast(steps=2), max_tokens=8, cache=False, temperature=1.0)
    dspy.configure(adapter=BoxedAdapter())
    student = _program(lm)
    optimizer = dspy.BootstrapFinetune(metric=lambda example, pred, trace=None: True, num_threads=2)
    compiled = optimizer.compile(student, trainset=_trainset())
    trained = tiny_engine.weights_id
    assert trained != tiny_engine.base_fingerprint  # the adapter moved
    assert compiled.lm.pinned_weights == trained
    tiny_engine.reset_adapter()  # someone else changes the engine; the student keeps its adapter
    compiled(question="What is 1+1?")
    assert compiled.lm.history[-1]["response"].model.endswith(trained)
    assert tiny_engine.weights_id == trained


def test_lora_finetune_as_the_w_step_of_better_together(tiny_engine):
    lm = tiny_engine.lm(max_tokens=8, cache=False, temperature=1.0)  # sampled: the tiny model's greedy text is blank
    dspy.configure(adapter=BoxedAdapter())
    metric = lambda example, pred, trace=None: 1.0  # noqa: E731
    weights = LoRAFinetune(metric, config=fast(steps=2), num_threads=2)
    optimizer = dspy.BetterTogether(metric=metric, w=weights)
    compiled = optimizer.compile(_program(lm), trainset=_trainset(), valset_ratio=0, strategy="w")
    assert weights.history and weights.history[-1]["update"]["steps"] == 2
    assert compiled.predictors()[0].lm.pinned_weights == tiny_engine.weights_id != tiny_engine.base_fingerprint


def test_better_together_keeps_the_baseline_on_its_own_weights(tiny_engine):
    """With a pinned LM, BetterTogether's untrained candidate keeps answering with the base weights."""
    lm = tiny_engine.lm(pinned=True, max_tokens=8, cache=False, temperature=1.0)
    base = lm.pinned_weights
    dspy.configure(adapter=BoxedAdapter())
    metric = lambda example, pred, trace=None: 1.0  # noqa: E731 - a tie: BetterTogether keeps the original
    optimizer = dspy.BetterTogether(metric=metric, w=LoRAFinetune(metric, config=fast(steps=2), num_threads=2))
    compiled = optimizer.compile(_program(lm), trainset=_trainset(), valset=_trainset()[:2], strategy="w")
    assert tiny_engine.pin() != base  # the w step trained the adapter...
    compiled(question="What is 1+1?")
    assert tiny_engine.weights_id == base  # ...but the chosen original program runs on the base weights


def test_failed_parses_are_not_counted_as_passing_traces():
    from rosa2_dspy.weights import traces_to_rows

    predictor = dspy.Predict(Reply)
    trace = [(predictor, {"question": "2+2?"}, dspy.Prediction(reply="four"))]
    item = lambda score: {"score": score, "trace": trace}  # noqa: E731
    adapter = BoxedAdapter()
    assert traces_to_rows([item(-1), item(0.0)], adapter) == []  # -1: DSPy's score for a failed parse
    rows = traces_to_rows([item(1.0)], adapter)
    assert len(rows) == 1 and rows[0]["completion"] == "four" and rows[0]["label"] is True
    kto = traces_to_rows([item(-1), item(1.0)], adapter, objective="kto")
    assert [r["label"] for r in kto] == [False, True]


def test_kto_weights_are_balanced_per_update(tiny_engine):
    updater = LoRAUpdater(tiny_engine, fast(objective="kto", steps=1))
    updater.update([kto_row(PROMPT, GOOD, True)] + [kto_row(PROMPT, f"wrong {i}", False) for i in range(3)])
    trainer = updater._trainers["kto"]
    assert trainer.desirable_weight == pytest.approx(3.0) and trainer.undesirable_weight == 1.0
    updater.config = fast(objective="kto", steps=1, balance=False)
    updater.update([kto_row(PROMPT, GOOD, True)] + [kto_row(PROMPT, "wrong", False)] * 3)
    assert trainer.desirable_weight == 1.0


def test_an_update_prepares_its_rows_without_hashing_the_tokenizer():
    """Dataset.map pickles its arguments (TRL's tokenize step passes the tokenizer: 3 s a time for Qwen's)
    to name a cache file; inside an update it must not, and outside it datasets hashes as before."""
    from datasets import Dataset

    from rosa2_dspy.weights.updater import _light_datasets

    pickled = []

    class Heavy:
        def __reduce__(self):
            pickled.append(1)
            return (Heavy, ())

    def tag(row, heavy):
        return {"n": row["n"] + 1}

    with _light_datasets():
        out = Dataset.from_list([{"n": 1}, {"n": 2}]).map(tag, fn_kwargs={"heavy": Heavy()})
        out = out.filter(lambda row, heavy: row["n"] > 2, fn_kwargs={"heavy": Heavy()})
    assert out["n"] == [3] and pickled == []
    Dataset.from_list([{"n": 1}]).map(tag, fn_kwargs={"heavy": Heavy()})
    assert pickled, "outside an update, datasets fingerprints as it always did"


def test_the_fused_head_scores_only_the_reply_on_cpu_and_trains_as_before(tiny_engine, monkeypatch):
    """TRL's fused LM head scores every position on devices without Triton; an update on CPU hands it only the
    labelled (reply) positions, the policy's and the reference's, and moves the adapter as scoring all would."""
    from trl.trainer import utils as trl_utils

    from rosa2_dspy.weights import updater as updater_module

    scored = []
    real = trl_utils._ChunkedLogProbFunction

    class Spy:
        @staticmethod
        def apply(hidden, *args):
            scored.append(hidden.shape[0])
            return real.apply(hidden, *args)

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", Spy)
    rows = [kto_row(PROMPT, BAD, False)]
    config = fast(objective="apo_zero_unpaired", steps=2, batch_size=1)

    compact = LoRAUpdater(tiny_engine, config)
    compact.update(rows)
    trained = {k: v.clone() for k, v in tiny_engine.adapter_state().items()}
    replies = set(scored)  # the policy's and the reference's forwards, every step: the same reply tokens

    tiny_engine.reset_adapter()
    scored.clear()
    monkeypatch.setattr(updater_module, "_score_completions_only", contextlib.nullcontext)
    LoRAUpdater(tiny_engine, config).update(rows)
    (every,) = set(scored)
    assert len(replies) == 1 and 0 < replies.pop() < every / 2, "only the reply's positions are scored"
    # the same update up to float rounding: Adam moves each element by about the learning rate whatever the size of
    # its gradient, so an element whose gradient is near zero may move another way (1 of 512 on a CPU without AMX);
    # the adapter as a whole must agree
    for name, tensor in tiny_engine.adapter_state().items():
        close = torch.isclose(tensor, trained[name], rtol=1e-4, atol=1e-6)
        assert close.float().mean() >= 0.99, name
        assert (tensor - trained[name]).norm() <= 1e-2 * trained[name].norm(), name
    from trl.kernels.chunked_logprob import _use_triton
    assert trl_utils._use_triton is _use_triton, "the switch is put back after the update"


def test_an_update_from_the_base_weights_takes_its_reference_from_the_policy_forward(tiny_engine, monkeypatch):
    """A conversation's first update starts at the base weights, its objective's reference: the reference
    forward is answered by the policy forward (one forward fewer) and the adapter moves exactly as with it;
    an update from moved weights runs its reference forward."""
    from rosa2_dspy.weights import updater as updater_module

    rows = [kto_row(PROMPT, BAD, False), kto_row(PROMPT, GOOD, True)]
    config = fast(objective="apo_zero_unpaired", steps=1, batch_size=2)
    updater = LoRAUpdater(tiny_engine, config)
    forwards = []
    tiny_engine.peft_model.base_model.register_forward_pre_hook(
        lambda module, args: forwards.append("policy" if torch.is_grad_enabled() else "reference"))
    updater.update(rows)
    assert forwards == ["policy"], "from the base weights the reference forward is the policy's"
    reused = {k: v.clone() for k, v in tiny_engine.adapter_state().items()}
    forwards.clear()
    updater.update(rows)
    assert forwards == ["policy", "reference"], "from moved weights the reference runs"

    tiny_engine.reset_adapter()
    forwards.clear()
    monkeypatch.setattr(updater_module, "_reference_from_policy", lambda model: contextlib.nullcontext())
    updater.update(rows)
    assert forwards == ["policy", "reference"]
    for name, tensor in tiny_engine.adapter_state().items():
        torch.testing.assert_close(tensor, reused[name], rtol=0, atol=0)


def _block_outputs_need_grad(engine, updater) -> list[bool]:
    """Whether each transformer block's output carried autograd history during one update's training forward."""
    blocks = [m for n, m in engine.model.named_modules() if n.split(".")[-2:-1] == ["layers"]]
    seen: dict[int, bool] = {}

    def record(index):
        def hook(module, args, out):
            seen.setdefault(index, (out[0] if isinstance(out, tuple) else out).requires_grad)
        return hook

    hooks = [block.register_forward_hook(record(i)) for i, block in enumerate(blocks)]
    try:
        updater.update([sft_row(PROMPT, GOOD)])
    finally:
        for hook in hooks:
            hook.remove()
    return [seen[i] for i in range(len(blocks))]


def test_an_adapter_on_the_last_blocks_keeps_the_backward_pass_out_of_the_others(tokenizer):
    """``layers=1``: the adapter sits on the last block only, so the blocks below it carry no autograd history
    and the backward pass stops at the last block; an update still moves the adapter."""
    everywhere = LocalEngine(make_tiny_model(tokenizer), tokenizer, name="tiny")
    assert _block_outputs_need_grad(everywhere, LoRAUpdater(everywhere, fast(steps=1))) == [True, True]
    last = LocalEngine(make_tiny_model(tokenizer), tokenizer, name="tiny")
    updater = LoRAUpdater(last, fast(layers=1, steps=1))
    names = list(last.adapter_state())
    assert names and all(".layers.1." in name for name in names)
    assert _block_outputs_need_grad(last, updater) == [False, True]
    assert updater.history[-1].update_shift > 0
    LoRAUpdater(last, fast(layers=1))  # another update on the same adapter
    with pytest.raises(UpdateError, match="one adapter"):  # the adapter is shaped once: refused, not ignored
        LoRAUpdater(last, fast(steps=1))
    with pytest.raises(UpdateError, match="one adapter"):
        LoRAUpdater(last, fast(layers=1, adapter_dtype="model"))
    with pytest.raises(UpdateError, match="layers"):
        UpdateConfig(layers=0)


def test_the_adapter_can_live_in_the_models_own_dtype(tokenizer):
    """On a 16-bit model PEFT keeps the adapter in float32 (each LoRA layer casts up and back); ``adapter_dtype=
    "model"`` keeps it in the model's dtype. Either way an update trains it."""
    for setting, dtype in (("float32", torch.float32), ("model", torch.bfloat16)):
        engine = LocalEngine(make_tiny_model(tokenizer).to(torch.bfloat16), tokenizer, name="tiny-bf16")
        updater = LoRAUpdater(engine, fast(adapter_dtype=setting, steps=2))
        assert {tensor.dtype for tensor in engine.adapter_state().values()} == {dtype}
        result = updater.update([sft_row(PROMPT, GOOD)])
        assert result.update_shift > 0 and not result.rolled_back
    with pytest.raises(UpdateError, match="adapter_dtype"):
        UpdateConfig(adapter_dtype="float16")


def _block_forwards(engine, update) -> list[int]:
    """How many times each transformer block's MLP ran forward during ``update()``: counted in ``forward`` itself,
    since module hooks do not run when the backward pass recomputes a checkpointed block."""
    mlps = [m.mlp for n, m in engine.model.named_modules() if n.split(".")[-2:-1] == ["layers"]]
    calls = [0] * len(mlps)

    def counting(index, forward):
        def wrapped(*args, **kwargs):
            calls[index] += 1
            return forward(*args, **kwargs)
        return wrapped

    for i, mlp in enumerate(mlps):
        mlp.forward = counting(i, mlp.forward)
    try:
        update()
    finally:
        for mlp in mlps:
            del mlp.forward  # the class's again
    return calls


@pytest.mark.parametrize("objective", ["sft", "apo_zero_unpaired"])
def test_activation_checkpointing_recomputes_blocks_and_gives_the_same_update(tokenizer, objective):
    """``activation_checkpointing``: each block keeps only its input and runs its forward again in the backward
    pass, one more forward a step; the adapter after the update is the same to the bit. Turned off again on the
    same engine, each block runs as without it."""
    rows = [kto_row(PROMPT, GOOD, True), kto_row(PROMPT, BAD, False)] if objective != "sft" else [sft_row(PROMPT, GOOD)]
    steps = 2
    engines, updaters, results, forwards = {}, {}, {}, {}
    for on in (False, True):
        engines[on] = engine = LocalEngine(make_tiny_model(tokenizer), tokenizer, name="tiny")
        updaters[on] = LoRAUpdater(engine, fast(objective=objective, steps=steps, activation_checkpointing=on))
        forwards[on] = _block_forwards(engine, lambda: updaters[on].update(rows))
        results[on] = {name: tensor.clone() for name, tensor in engine.adapter_state().items()}
    plain = forwards[False][0]  # (apo_zero_unpaired: a reference forward too, under no_grad, from the second step)
    assert forwards[False] == [plain, plain] and forwards[True] == [plain + steps, plain + steps]
    for name, tensor in results[False].items():
        torch.testing.assert_close(results[True][name], tensor, rtol=0, atol=0)
    again = LoRAUpdater(engines[True], fast(objective=objective, steps=steps))  # off again, from moved weights
    assert _block_forwards(engines[True], lambda: again.update(rows)) == \
        _block_forwards(engines[False], lambda: updaters[False].update(rows))


def test_checkpointing_min_tokens_recomputes_only_forwards_that_large_and_gives_the_same_update(tokenizer):
    """``checkpointing_min_tokens``: with activation checkpointing on, a forward with gradients over at least N
    tokens (rows x columns) recomputes its blocks in the backward pass and a smaller one does not; the reference's
    forward (no gradients) never does. The adapter is the same to the bit whichever forwards checkpoint. With each
    row on its own prefix, the rows' forwards decide one by one."""
    rows = [kto_row(PROMPT, BAD, False), kto_row([{"role": "user", "content": "What is 12 times 3, exactly?"}],
                                                  GOOD, True)]

    def run(**settings):
        engine = LocalEngine(make_tiny_model(tokenizer), tokenizer, name="tiny")
        updater = LoRAUpdater(engine, fast(objective="apo_zero_unpaired", steps=2, **settings))
        seen = []  # (gradients?, tokens) of each block-0 forward (hooks do not run in a recompute)
        block = engine.peft_model.get_base_model().model.layers[0]
        block.register_forward_pre_hook(lambda module, args: seen.append(
            (torch.is_grad_enabled(), args[0].shape[0] * args[0].shape[1])))
        calls = _block_forwards(engine, lambda: updater.update(rows))
        return calls[0], seen, {k: v.clone() for k, v in engine.adapter_state().items()}

    plain, seen, state = run()
    (tokens,) = {n for grad, n in seen if grad}  # the policy forwards (step 1, step 2) cover the whole rows
    assert (True, tokens) in seen and (False, tokens) in seen  # and the reference's, from moved weights
    for min_tokens, recomputed in ((tokens + 1, 0), (tokens, 2), (1, 2)):
        calls, _, moved = run(activation_checkpointing=True, checkpointing_min_tokens=min_tokens)
        assert calls == plain + recomputed, min_tokens
        assert same_state(moved, state)
    # each row on its own prefix: two forwards with gradients a step, of different sizes; only the larger checkpoints
    settings = dict(frozen_prompt=True, prefix_per_row=True)
    plain, seen, state = run(**settings)
    sizes = sorted({n for grad, n in seen if grad})
    assert len(sizes) == 2
    calls, _, moved = run(activation_checkpointing=True, checkpointing_min_tokens=sizes[1], **settings)
    assert calls == plain + 2 and same_state(moved, state)
    with pytest.raises(UpdateError, match="checkpointing_min_tokens"):
        UpdateConfig(checkpointing_min_tokens=-1)


def _kto_batch(tokenizer):
    """Two rows with left-padded prompts and right-padded replies, the labels the reply tokens (-100 elsewhere):
    a layout where every row's reply starts at one column (TRL's KTO collator right-pads prompt and reply
    together, the layout of the updater tests). The prompts differ in length, so the first row's is padded."""
    prompts = [tokenizer.encode("What is 2+3?"), tokenizer.encode("Tell me, please, what is 12 times 3?")]
    replies = [tokenizer.encode(" 2+3=5, so 5."), tokenizer.encode(" 36")]
    p, r = max(map(len, prompts)), max(map(len, replies))
    pad = tokenizer.pad_token_id
    ids = [[pad] * (p - len(a)) + a + b + [pad] * (r - len(b)) for a, b in zip(prompts, replies)]
    mask = [[0] * (p - len(a)) + [1] * (len(a) + len(b)) + [0] * (r - len(b)) for a, b in zip(prompts, replies)]
    labels = [[-100] * p + b + [-100] * (r - len(b)) for b in replies]
    return torch.tensor(ids), torch.tensor(mask), torch.tensor(labels), p


def _moved_adapter(tokenizer):
    """A tiny engine whose adapter has taken one update (so TRL's fused head is installed) and then a random push
    large enough to matter at the prompt; returns the engine and its PEFT model."""
    engine = LocalEngine(make_tiny_model(tokenizer), tokenizer, name="tiny")
    LoRAUpdater(engine, fast(objective="apo_zero_unpaired", steps=1)).update([kto_row(PROMPT, BAD, False)])
    model = engine.peft_model
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    return engine, model


def _scored(model, ids, mask, labels):
    """Per-token log-probabilities of the labels (TRL's fused head) and the adapter's gradient of their sum."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    out.log_probs.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.log_probs.detach(), grads


def test_a_frozen_prompt_scores_the_replies_the_same_and_takes_their_gradient_only(tokenizer):
    """``frozen_prompt``: the prompt columns run once without gradients as a cached prefix and the forward
    covers the replies only; the reply's log-probabilities are those of the whole row, in TRL's shapes. The
    gradient is the one a forward of the replies against the prompt's detached keys and values gives, with
    activation checkpointing too (its recompute reads the same prefix), and not the whole row's."""
    from transformers.cache_utils import DynamicCache

    from rosa2_dspy.weights.updater import _prompt_as_frozen_prefix

    engine, model = _moved_adapter(tokenizer)
    ids, mask, labels, prompt = _kto_batch(tokenizer)
    split = prompt - 1
    model.train()
    forward_before = model.forward

    whole, whole_grads = _scored(model, ids, mask, labels)
    with _prompt_as_frozen_prefix(model):
        frozen, frozen_grads = _scored(model, ids, mask, labels)
    assert frozen.shape == whole.shape
    torch.testing.assert_close(frozen, whole, rtol=1e-5, atol=1e-5)
    assert (frozen[:, :split - 1] == 0).all(), "the prompt columns carry TRL's zero"

    backbone = model.get_base_model().base_model
    with torch.no_grad():
        prefix = DynamicCache(config=backbone.config)
        backbone(input_ids=ids[:, :split], attention_mask=mask[:, :split], past_key_values=prefix)
    model.zero_grad(set_to_none=True)
    suffix = model(input_ids=ids[:, split:], attention_mask=mask, labels=labels[:, split:], fused_lm_head=True,
                   past_key_values=prefix)
    suffix.log_probs.sum().backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(frozen_grads[name], param.grad, rtol=1e-4, atol=1e-7)
    differs = [not torch.allclose(frozen_grads[n], whole_grads[n], rtol=1e-3, atol=1e-6) for n in whole_grads]
    assert sum(differs) >= len(differs) // 2, "the prompt's own gradient is dropped"

    engine.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        with _prompt_as_frozen_prefix(model):
            checkpointed, checkpointed_grads = _scored(model, ids, mask, labels)
    finally:
        engine.model.gradient_checkpointing_disable()
    torch.testing.assert_close(checkpointed, frozen, rtol=1e-6, atol=1e-6)
    for name, grad in frozen_grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, rtol=1e-5, atol=1e-7)
    assert model.forward == forward_before, "the wrapper is removed"
    assert all("_can_checkpoint_with_cache" not in vars(m) for m in model.modules())


def test_rows_whose_scored_tokens_start_at_different_columns_each_take_their_own_prefix(tokenizer):
    """``frozen_prompt`` with ``prefix_per_row`` and rows whose first scored column differs (replies of different
    lengths under a reply tail): the log-probabilities are the whole rows', and the gradient is the sum of each
    row's own, against its own detached prefix, not the one a prefix shared at the earliest column gives (which is
    what the batched split, the default, gives)."""
    from transformers.cache_utils import DynamicCache

    from rosa2_dspy.weights.updater import _last_labelled, _prompt_as_frozen_prefix

    engine, model = _moved_adapter(tokenizer)
    ids, mask, labels, _ = _kto_batch(tokenizer)
    labels = _last_labelled(labels, 1)  # each reply's last token: the replies differ in length
    splits = ((labels != -100).int().argmax(dim=1) - 1).tolist()
    assert splits[0] != splits[1]
    model.train()
    whole, _ = _scored(model, ids, mask, labels)
    with _prompt_as_frozen_prefix(model, per_row=True):
        frozen, frozen_grads = _scored(model, ids, mask, labels)
    with _prompt_as_frozen_prefix(model):  # (one prefix for the batch, at its earliest scored column)
        batched, batched_grads = _scored(model, ids, mask, labels)
    torch.testing.assert_close(frozen, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched, whole, rtol=1e-5, atol=1e-5)
    for items in (None, 7):  # the loss (SFT's): over the labelled tokens, or a count the trainer gives
        extra = {} if items is None else {"num_items_in_batch": items}
        with torch.no_grad():
            plain = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True, **extra).loss
        with _prompt_as_frozen_prefix(model, per_row=True):
            split = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True, **extra).loss
        torch.testing.assert_close(split.detach(), plain, rtol=1e-5, atol=1e-6)

    def own_prefix_grads(shared: int | None):
        model.zero_grad(set_to_none=True)
        backbone = model.get_base_model().base_model
        for row, split in enumerate(splits):
            split = shared or split
            end = int(mask[row].nonzero().max()) + 1
            with torch.no_grad():
                prefix = DynamicCache(config=backbone.config)
                backbone(input_ids=ids[row:row + 1, :split], attention_mask=mask[row:row + 1, :split],
                         past_key_values=prefix)
            out = model(input_ids=ids[row:row + 1, split:end], attention_mask=mask[row:row + 1, :end],
                        labels=labels[row:row + 1, split:end], fused_lm_head=True, past_key_values=prefix)
            out.log_probs.sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    expected, shared = own_prefix_grads(None), own_prefix_grads(min(splits))
    for name, grad in frozen_grads.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-7)
    differs = [not torch.allclose(expected[n], shared[n], rtol=1e-3, atol=1e-6) for n in expected]
    assert sum(differs) >= len(differs) // 2, "a shared prefix would give another gradient"
    for name, grad in batched_grads.items():  # ... which is the batched split's (one batch, padded: 1e-3)
        torch.testing.assert_close(grad, shared[name], rtol=1e-3, atol=1e-6)
    # a row with nothing scored (its reply cut off) scores zeros and leaves the other's gradient as it was; no mask
    cut = labels.clone()
    cut[1] = -100
    with _prompt_as_frozen_prefix(model, per_row=True):
        alone, alone_grads = _scored(model, ids, mask, cut)
    assert (alone[1] == 0).all()
    torch.testing.assert_close(alone[0], frozen[0], rtol=1e-5, atol=1e-5)
    splits = splits[:1]
    first_only = own_prefix_grads(None)
    for name, grad in alone_grads.items():
        torch.testing.assert_close(grad, first_only[name], rtol=1e-4, atol=1e-7)
    # no attention mask (rows without padding): the same row twice, scored on its last token and the one before
    row = ids[:1, mask[0].bool()]
    twice, scored = row.repeat(2, 1), torch.full((2, row.shape[1]), -100)
    scored[0, -1], scored[1, -2] = row[0, -1], row[0, -2]
    with torch.no_grad():
        plain = model(input_ids=twice, labels=scored, fused_lm_head=True).log_probs
    with _prompt_as_frozen_prefix(model, per_row=True):
        split_rows = model(input_ids=twice, labels=scored, fused_lm_head=True).log_probs
    torch.testing.assert_close(split_rows.detach(), plain, rtol=1e-5, atol=1e-5)
    assert (plain != 0).sum() == 2


def _shared_prompt_batch(tokenizer):
    """A later update's layout: two rejected replies of different lengths under one prompt, prompt and reply
    right-padded together (TRL's KTO collator), the labels the reply tokens."""
    prompt = tokenizer.encode("Tell me, please, what is 12 times 3? Think it through.")
    replies = [tokenizer.encode(" 12 times 3 is 36, since 10 times 3 is 30 and 2 times 3 is 6."),
               tokenizer.encode(" 35, I would say")]
    width = len(prompt) + max(map(len, replies))
    pad = tokenizer.pad_token_id
    ids = [prompt + r + [pad] * (width - len(prompt) - len(r)) for r in replies]
    mask = [[1] * (len(prompt) + len(r)) + [0] * (width - len(prompt) - len(r)) for r in replies]
    labels = [[-100] * len(prompt) + r + [-100] * (width - len(prompt) - len(r)) for r in replies]
    return torch.tensor(ids), torch.tensor(mask), torch.tensor(labels), len(prompt)


def test_an_updates_shared_prompt_runs_once_and_each_row_stops_at_its_own_end(tokenizer):
    """``share_prefix``: the reference forward (no gradients) and, under ``frozen_prompt``, the policy's prefix and
    gradient columns run the prompt the rows share once, on one row, and each row only up to its own last token;
    the log-probabilities and the gradient are those without sharing (the same split column), for fewer tokens."""
    from rosa2_dspy.weights.updater import _last_labelled, _prompt_as_frozen_prefix, _reference_shares_prefix

    engine, model = _moved_adapter(tokenizer)
    ids, mask, labels, prompt = _shared_prompt_batch(tokenizer)
    ends = mask.sum(dim=1).tolist()
    assert ends[0] != ends[1] and ids.shape[1] == max(ends)
    seen = []  # (gradients?, rows x columns) of each forward of the first block
    block = model.get_base_model().model.layers[0]
    block.register_forward_pre_hook(lambda module, args: seen.append(
        (torch.is_grad_enabled(), args[0].shape[0] * args[0].shape[1])))
    model.train()

    with torch.no_grad():  # the reference's call
        plain = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
        seen.clear()
        with _reference_shares_prefix(model):
            shared = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    assert shared.log_probs.shape == plain.log_probs.shape
    torch.testing.assert_close(shared.log_probs, plain.log_probs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shared.loss, plain.loss, rtol=1e-5, atol=1e-6)
    # the prompt less its last column once, then each row from there to its own end, never the padding
    assert sorted(n for _, n in seen) == sorted([prompt - 1] + [end - prompt + 1 for end in ends])
    assert sum(n for _, n in seen) < ids.numel()

    tail = _last_labelled(labels, 2)  # (a reply tail: the shorter reply sets the batch's split)
    split = int((tail[1] != -100).int().argmax()) - 1
    with _prompt_as_frozen_prefix(model):
        batched, batched_grads = _scored(model, ids, mask, tail)
    seen.clear()
    with _prompt_as_frozen_prefix(model, share=True):
        frozen, frozen_grads = _scored(model, ids, mask, tail)
    torch.testing.assert_close(frozen, batched, rtol=1e-5, atol=1e-5)
    for name, grad in batched_grads.items():  # the same split: the same gradient, to the rounding of other row
        # counts (1e-5 of its norm here; another split moves it by about its norm)
        assert (frozen_grads[name] - grad).norm() <= 1e-4 * grad.norm(), name
    grads = [n for grad, n in seen if grad]
    common = int((ids[0] != ids[1]).nonzero()[0])  # the prompt, and any first reply token the two share
    assert split > common >= prompt
    assert sorted(n for grad, n in seen if not grad) == sorted([common, 2 * (split - common)])
    assert sorted(grads) == sorted(end - split for end in ends) and sum(grads) < 2 * (ids.shape[1] - split)
    # rows that begin differently share nothing; each still stops at its own end, with the same numbers
    other = ids.clone()
    other[1, 0] = (ids[0, 0] + 1) % len(tokenizer)
    with torch.no_grad():
        plain = model(input_ids=other, attention_mask=mask, labels=labels, fused_lm_head=True)
        seen.clear()
        with _reference_shares_prefix(model):
            apart = model(input_ids=other, attention_mask=mask, labels=labels, fused_lm_head=True)
    torch.testing.assert_close(apart.log_probs, plain.log_probs, rtol=1e-5, atol=1e-5)
    assert sorted(n for _, n in seen) == sorted(ends)


def test_an_update_sharing_its_prompt_moves_the_adapter_as_one_without(tokenizer):
    """Through ``LoRAUpdater`` at the session's settings (apo_zero_unpaired, frozen prompt, reply tail): a first
    update and a later one (the reference forward from moved weights) on two replies under one prompt give the
    same adapter with ``share_prefix`` (the session's default) as without, while the blocks run fewer token
    positions."""
    from rosa2_dspy.coadapt import session_update_config

    long_reply = "12 times 3: 10 times 3 is 30, 2 times 3 is 6, so 30 + 6 = 36. \\boxed{36}"
    rows = [kto_row(PROMPT, BAD, False), kto_row(PROMPT, long_reply, False)]
    moves, shifts, tokens = {}, {}, {}
    for setting in ("plain", "share_prefix", "prefix_per_row"):
        engine = LocalEngine(make_tiny_model(tokenizer), tokenizer, name="tiny")
        config = session_update_config(learning_rate=1e-2, max_length=128, reply_tail=3,
                                       share_prefix=setting == "share_prefix",
                                       prefix_per_row=setting == "prefix_per_row")
        updater = LoRAUpdater(engine, config)
        start = engine.snapshot()
        seen = []
        block = engine.peft_model.get_base_model().model.layers[0]
        block.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0] * args[0].shape[1]))
        shifts[setting] = [updater.update(rows).update_shift for _ in range(2)]
        moves[setting] = torch.cat([(value.detach() - start[name]).flatten()
                                    for name, value in engine.adapter_state().items()])
        tokens[setting] = sum(seen)

    def apart(setting: str) -> float:
        return float((moves[setting] - moves["plain"]).norm() / moves["plain"].norm())

    # the same update to rounding (Adam's step magnifies a gradient's last digits where the gradient is near zero:
    # 2e-4 of the adapter's move here), where another split of the rows (prefix_per_row) moves it elsewhere (0.7)
    assert apart("share_prefix") < 1e-2 < 0.1 < apart("prefix_per_row")
    assert shifts["share_prefix"] == pytest.approx(shifts["plain"], rel=1e-5) and min(shifts["plain"]) > 0
    assert tokens["share_prefix"] < tokens["plain"]
    # rows run one by one checkpoint as their call would: by all its gradient tokens, not each row's own

    def checkpointed(min_tokens: int | None):
        engine = LocalEngine(make_tiny_model(tokenizer), tokenizer, name="tiny")
        config = session_update_config(learning_rate=1e-2, max_length=128, reply_tail=3,
                                       activation_checkpointing=min_tokens is not None,
                                       checkpointing_min_tokens=min_tokens or 0)
        updater = LoRAUpdater(engine, config)
        sizes = []
        block = engine.peft_model.get_base_model().model.layers[0]
        block.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0] * args[0].shape[1])
                                        if torch.is_grad_enabled() else None)
        calls = _block_forwards(engine, lambda: updater.update(rows))
        return calls[0], sizes, {k: v.clone() for k, v in engine.adapter_state().items()}

    plain, sizes, state = checkpointed(None)
    assert len(sizes) == 2 and sum(sizes) > max(sizes)  # the rows' gradient columns, one forward each
    calls, _, moved = checkpointed(sum(sizes))
    assert calls == plain + 2 and same_state(moved, state)  # both recomputed, the same update to the bit


@pytest.mark.parametrize("objective", ["kto", "dpo"])
def test_kto_and_dpo_updates_sharing_their_prompt_move_the_adapter_as_without(tokenizer, objective):
    """KTO's forwards (its KL ones too, on mismatched pairs) and DPO's chosen and rejected rows under one prompt:
    the same shifts, to rounding, with ``share_prefix`` as without."""
    from rosa2_dspy.coadapt import session_update_config
    from rosa2_dspy.weights import dpo_row

    rows = ([kto_row(PROMPT, BAD, False), kto_row(PROMPT, "2+3 is 5, so \\boxed{5}", True),
             kto_row(PROMPT, "I think it is 8", False)] if objective == "kto" else [dpo_row(PROMPT, GOOD, BAD)])
    shifts = {}
    for share in (False, True):
        engine = LocalEngine(make_tiny_model(tokenizer), tokenizer, name="tiny")
        updater = LoRAUpdater(engine, session_update_config(objective=objective, learning_rate=1e-2, max_length=128,
                                                            reply_tail=3, share_prefix=share))
        shifts[share] = [updater.update(rows).update_shift for _ in range(2)]
    assert shifts[True] == pytest.approx(shifts[False], rel=1e-5) and min(shifts[False]) > 0


@pytest.mark.parametrize("checkpointing,per_row", [(False, False), (True, False), (False, True)])
def test_an_update_with_a_frozen_prompt_trains_on_the_replies_only(tokenizer, checkpointing, per_row):
    """Through ``LoRAUpdater``: with ``frozen_prompt`` the blocks run with gradients over the reply columns only
    (the prompt once, without), the first update still takes its reference from the policy forward, and the
    adapter moves, though not as the whole row's update moves it."""
    rows = [kto_row(PROMPT, BAD, False), kto_row([{"role": "user", "content": "What is 12 times 3, exactly?"}],
                                                  GOOD, True)]
    widths, states = {}, {}
    for frozen in (False, True):
        engine = LocalEngine(make_tiny_model(tokenizer), tokenizer, name="tiny")
        updater = LoRAUpdater(engine, fast(objective="apo_zero_unpaired", steps=1, frozen_prompt=frozen,
                                           activation_checkpointing=checkpointing, prefix_per_row=per_row))
        seen = []
        block = engine.peft_model.get_base_model().model.layers[0]
        block.register_forward_pre_hook(lambda module, args: seen.append(
            ("grad" if torch.is_grad_enabled() else "no grad", args[0].shape[1])))
        result = updater.update(rows)
        assert not result.rolled_back and result.update_shift > 0
        widths[frozen], states[frozen] = seen, {k: v.clone() for k, v in engine.adapter_state().items()}
    (kind, whole), = widths[False]  # one policy forward; the reference is the policy's (from the base weights)
    assert kind == "grad"
    if per_row:  # the prompts differ in length: each row on its own, its prompt without gradients, then its reply
        # with them up to its last real token (a shared prefix puts the longer prompt's end under gradients)
        (kind, prompt), (kind2, reply), (kind3, prompt2), (kind4, reply2) = widths[True]
        assert (kind, kind2, kind3, kind4) == ("no grad", "grad") * 2 and prompt != prompt2
        assert max(prompt + reply, prompt2 + reply2) == whole and reply + reply2 < 2 * (whole - min(prompt, prompt2))
    else:  # one batch, split where the shorter prompt ends
        (kind, prompt), (kind2, reply) = widths[True]
        assert (kind, kind2) == ("no grad", "grad") and prompt + reply == whole and reply < whole / 2 + 8
    assert not same_state(states[False], states[True])


def test_a_reply_tail_scores_each_replys_last_tokens_in_every_forward(tokenizer):
    """``reply_tail``: each row keeps only its last N labels, whatever its reply's length and padding; the
    policy's log-probabilities there are the whole reply's, zero elsewhere."""
    from rosa2_dspy.weights.updater import _last_labelled, _score_reply_tail

    labels = torch.tensor([[-100, -100, 5, 6, 7, 8, -100], [-100, 9, 10, -100, -100, -100, -100],
                           [-100] * 7])
    assert _last_labelled(labels, 2).tolist() == [[-100, -100, -100, -100, 7, 8, -100],
                                                   [-100, 9, 10, -100, -100, -100, -100], [-100] * 7]
    assert torch.equal(_last_labelled(labels, 4), labels)

    engine = LocalEngine(make_tiny_model(tokenizer), tokenizer, name="tiny")
    LoRAUpdater(engine, fast(objective="apo_zero_unpaired", steps=1)).update([kto_row(PROMPT, BAD, False)])
    model = engine.peft_model
    ids, mask, labels, prompt = _kto_batch(tokenizer)
    whole, _ = _scored(model, ids, mask, labels)
    with _score_reply_tail(model, 2):
        tail, grads = _scored(model, ids, mask, labels)
        with torch.no_grad():
            unscored = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True).log_probs
    kept = (_last_labelled(labels, 2) != -100)[:, 1:]
    assert int(kept.sum()) == 4 and int((labels != -100).sum()) > 4
    torch.testing.assert_close(tail[kept], whole[kept], rtol=1e-5, atol=1e-5)
    assert (tail[~kept] == 0).all() and (unscored[~kept] == 0).all(), "no-gradient forwards (the reference's) too"
    assert any(g.abs().sum() > 0 for g in grads.values())


def test_an_update_on_the_replies_tails_with_a_frozen_prompt_runs_the_rest_without_gradients(tokenizer):
    """Through ``LoRAUpdater``, from moved weights (so with a reference forward): every forward scores at most N
    tokens of each reply; with ``frozen_prompt`` the blocks run with gradients over the last N (+1) columns only,
    the prompt and the reply's head once without; and the update is not the whole reply's."""
    tail = 3
    rows = [kto_row(PROMPT, "Let me think: 2+3 is 5, since 2+2 is 4. So the answer is 7.", False)]
    states, seen = {}, {}
    for reply_tail in (None, tail):
        engine = LocalEngine(make_tiny_model(tokenizer), tokenizer, name="tiny")
        updater = LoRAUpdater(engine, fast(objective="apo_zero_unpaired", steps=1, frozen_prompt=True,
                                           reply_tail=reply_tail))
        first = []
        hook = engine.peft_model.get_base_model().model.layers[0].register_forward_pre_hook(
            lambda module, args: first.append(torch.is_grad_enabled()))
        updater.update(rows)  # the weights move off the base: the next update runs its reference forward
        hook.remove()
        # from the base weights the reference is the policy's forward: the prefix and the suffix, nothing more
        assert first == [False, True]
        calls, widths = [], []
        base = engine.peft_model.get_base_model()
        base.register_forward_pre_hook(lambda module, args, kwargs: calls.append(
            (torch.is_grad_enabled(), (kwargs["labels"] != -100).sum(dim=1).tolist())
            if kwargs.get("labels") is not None else None), with_kwargs=True)
        base.model.layers[0].register_forward_pre_hook(lambda module, args: widths.append(
            ("grad" if torch.is_grad_enabled() else "no grad", args[0].shape[1])))
        result = updater.update(rows)
        assert not result.rolled_back and result.update_shift > 0
        states[reply_tail], seen[reply_tail] = {k: v.clone() for k, v in engine.adapter_state().items()}, widths
        scored = [c for c in calls if c is not None]
        assert {grad for grad, _ in scored} == {True, False}, "the policy's forward and the reference's"
        if reply_tail:
            assert all(n == [tail] for _, n in scored)
        else:
            assert all(n[0] > 10 for _, n in scored)
    kinds = [kind for kind, _ in seen[tail]]
    assert kinds == ["no grad", "grad", "no grad"]  # prefix, suffix with gradients, the reference's whole row
    (_, prefix), (_, suffix), (_, row) = seen[tail]
    assert prefix + suffix == row and suffix == tail + 1
    assert seen[None][1][1] > suffix + 10, "without a tail the gradient columns span the reply"
    assert not same_state(states[None], states[tail])


def test_reply_tail_takes_a_length_or_zero_for_the_whole_reply_and_sft_scores_the_whole_reply(tiny_engine):
    with pytest.raises(UpdateError, match="reply_tail must be >= 1, or 0"):
        UpdateConfig(objective="kto", reply_tail=-1)
    assert UpdateConfig(objective="kto", reply_tail=0).reply_tail is None
    assert UpdateConfig(objective="dpo", reply_tail=64).reply_tail == 64
    # sft's loss is a mean over the reply: the tail is not applied, so the update is the whole reply's
    states = []
    for tail in (None, 2):
        tiny_engine.reset_adapter()
        LoRAUpdater(tiny_engine, fast(steps=1, reply_tail=tail)).update([sft_row(PROMPT, GOOD)])
        states.append({k: v.clone() for k, v in tiny_engine.adapter_state().items()})
    assert same_state(*states)
