"""Prepacked base weights (rosa2_dspy/engine/prepack.py): the oneDNN-packed copy replaces the plain weight inside
the blocks (the head keeps both), forwards with and without gradients read it, with the same result bit for bit in
bf16; weights changed after packing are read plain; updates come out the same; copies, pickles and state dicts
hold the plain weights."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_model
from rosa2_dspy.engine import GenSettings, LocalEngine
from rosa2_dspy.engine.prepack import base_linears, default_for, packed_count, plain_weights_dropped, supported
from rosa2_dspy.weights import LoRAUpdater, UpdateConfig, kto_row

needs_bf16 = pytest.mark.skipif(not supported("cpu", torch.bfloat16), reason="this PyTorch cannot pack bf16 weights")
needs_fp32 = pytest.mark.skipif(not supported("cpu", torch.float32), reason="this PyTorch has no oneDNN")

PROMPT = [{"role": "user", "content": "What is 2+3?"}]


def bf16_engine(tokenizer, prepack=None, init=0.2):
    return LocalEngine(make_tiny_model(tokenizer, init=init).to(torch.bfloat16), tokenizer, name="tiny-bf16",
                       prepack=prepack)


def logits(engine, ids, grad: bool = False):
    with (torch.enable_grad() if grad else torch.inference_mode()):
        return engine.model(input_ids=torch.tensor([ids])).logits.detach().clone()


@needs_bf16
def test_the_default_packs_a_bf16_model(tokenizer):
    engine = bf16_engine(tokenizer)
    assert engine.prepacked and packed_count(engine.model) == len(base_linears(engine.model)) == 2 * 7 + 1
    assert engine.info["prepacked_linears"] == 15
    assert default_for("cpu", torch.bfloat16) and not default_for("cuda", torch.bfloat16)
    engine.set_prepack(False)
    assert not engine.prepacked and packed_count(engine.model) == 0 and "prepacked_linears" not in engine.info


@needs_fp32
def test_the_default_packs_a_float32_model_too_and_no_prepack_serves_it_plain(tokenizer):
    """Float32's default since session 30 (BENCHMARKS.md): packed, unless asked not to."""
    fp32 = LocalEngine(make_tiny_model(tokenizer), tokenizer, name="tiny")
    assert fp32.prepacked and packed_count(fp32.model) == 15 and default_for("cpu", torch.float32)
    assert not default_for("cuda", torch.float32) and not default_for("cpu", torch.float16)
    plain = LocalEngine(make_tiny_model(tokenizer), tokenizer, name="tiny", prepack=False)
    assert not plain.prepacked and packed_count(plain.model) == 0
    fp32.set_prepack(False)
    assert not fp32.prepacked and packed_count(fp32.model) == 0 and "prepacked_linears" not in fp32.info


@needs_bf16
def test_bf16_logits_are_the_same_bit_for_bit_and_come_from_the_packed_copy(tokenizer):
    engine = bf16_engine(tokenizer, prepack=False)
    ids = engine.encode_chat(PROMPT)
    plain, with_grad = logits(engine, ids), logits(engine, ids, grad=True)
    engine.set_prepack(True)
    assert torch.equal(logits(engine, ids), plain) and torch.equal(logits(engine, ids, grad=True), with_grad)
    # the packed copy is what every forward reads: spoil one, and forwards with and without gradients change
    down = engine.model.model.layers[0].mlp.down_proj
    down.__dict__["forward"].packed = torch.ops.mkldnn._reorder_linear_weight(torch.zeros(down.weight.shape,
                                                                                          dtype=torch.bfloat16), None)
    assert not torch.equal(logits(engine, ids), plain)
    assert not torch.equal(logits(engine, ids, grad=True), with_grad)


@needs_bf16
def test_the_packed_copy_replaces_the_plain_weight_inside_the_blocks_and_state_dicts_stay_plain(tokenizer):
    """Packing costs no memory inside the blocks: each projection's weight is a one-element placeholder; the head
    keeps its plain weight (an update's fused head reads it). A state dict unpacks; unpacking restores the weights
    to the bit; a placeholder cannot be written to, and a converted one is refused, not read as garbage."""
    engine = bf16_engine(tokenizer, prepack=False)
    before = {k: v.clone() for k, v in engine.model.state_dict().items()}
    engine.set_prepack(True)
    model = engine.model
    blocks = [m for m in base_linears(model) if m is not model.get_output_embeddings()]
    assert plain_weights_dropped(model) == len(blocks) == 14
    assert all(m.weight.untyped_storage().nbytes() == 2 for m in blocks)
    assert model.get_output_embeddings().weight.untyped_storage().nbytes() >= model.get_output_embeddings().weight.numel()
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    with pytest.raises(RuntimeError), torch.no_grad():
        blocks[0].weight.mul_(2)
    engine.set_prepack(False)
    assert plain_weights_dropped(model) == 0 and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    engine.set_prepack(True)
    model.to(torch.float32)  # converts the placeholders' one element: there is no weight left to read
    with pytest.raises(RuntimeError, match="unpack the model"), torch.inference_mode():
        model(input_ids=torch.tensor([engine.encode_chat(PROMPT)]))


@needs_bf16
def test_a_weight_replaced_after_packing_is_read_plain(tokenizer):
    engine = bf16_engine(tokenizer, prepack=True)
    ids = engine.encode_chat(PROMPT)
    before = logits(engine, ids)
    up = engine.model.model.layers[1].mlp.up_proj
    up.weight = torch.nn.Parameter(up.__dict__["forward"].plain(up) * 3, requires_grad=False)
    changed = logits(engine, ids)
    assert not torch.equal(changed, before)
    engine.set_prepack(False)
    assert torch.equal(logits(engine, ids), changed)


@needs_bf16
def test_a_prepacked_model_copies_pickles_and_repacks_a_changed_weight(tokenizer):
    """An opaque oneDNN tensor has no storage to copy: a deep copy or a pickled copy gets the plain weights back
    and packs them at its first forward (and computes as the original), and packing again replaces a copy that
    went stale."""
    import copy
    import io

    engine = bf16_engine(tokenizer, prepack=True)
    ids = engine.encode_chat(PROMPT)
    expected = logits(engine, ids)
    buffer = io.BytesIO()
    torch.save(engine.model, buffer)
    buffer.seek(0)
    for clone in (copy.deepcopy(engine.model), torch.load(buffer, weights_only=False)):
        down = clone.model.layers[0].mlp.down_proj
        handle = down.__dict__["forward"]
        assert handle.module() is down and handle.packed is None and plain_weights_dropped(clone) == 0
        assert torch.equal(down.weight, engine.model.model.layers[0].mlp.down_proj.__dict__["forward"].plain(
            engine.model.model.layers[0].mlp.down_proj))
        with torch.inference_mode():
            assert torch.equal(clone(input_ids=torch.tensor([ids])).logits, expected)
        assert handle.packed is not None
    up = engine.model.model.layers[1].mlp.up_proj
    before = up.__dict__["forward"]
    up.weight = torch.nn.Parameter(before.plain(up) * 3, requires_grad=False)
    assert not before.fresh(up)
    engine.set_prepack(True)
    assert up.__dict__["forward"] is not before and up.__dict__["forward"].fresh(up)
    assert plain_weights_dropped(engine.model) == 14


@needs_bf16
@pytest.mark.parametrize("checkpointing", [False, True])
def test_bf16_greedy_replies_and_updates_are_the_same_prepacked(tokenizer, checkpointing):
    """The engine's greedy replies, and a failure-only update (its reference forward without gradients, its
    policy forward and backward through the packed copy), with and without prepacking."""
    settings = GenSettings(max_tokens=24, do_sample=False, temperature=0.0, top_p=None, top_k=None, seed=None)
    config = UpdateConfig(objective="apo_zero_unpaired", beta=0.5, steps=2, batch_size=2, learning_rate=1e-2,
                          max_length=128, activation_checkpointing=checkpointing)
    rows = [kto_row(PROMPT, "I think it is 7 or so", False), kto_row(PROMPT, "2+3=5. \\boxed{5}", True)]
    replies, adapters = [], []
    for prepack in (False, True, False):  # (in bf16 a process's first update may differ in its last bits)
        engine = bf16_engine(tokenizer, prepack=prepack)
        replies.append(engine.generate_one(PROMPT, settings).text)
        LoRAUpdater(engine, config).update(rows)
        adapters.append({k: v.clone() for k, v in engine.adapter_state().items()})
        replies.append(engine.generate_one(PROMPT, settings).text)
    assert replies[0] == replies[2] == replies[4] and replies[3] == replies[5]
    assert replies[3] != replies[2]  # the update moved the weights, and the packed model serves them
    assert all(torch.equal(adapters[1][k], adapters[2][k]) for k in adapters[2])


@needs_bf16
def test_the_packed_products_gradient_is_plain_f_linears_bit_for_bit():
    from rosa2_dspy.engine.prepack import _PackedLinear

    torch.manual_seed(0)
    weight, bias = torch.randn(48, 32, dtype=torch.bfloat16), torch.randn(48, dtype=torch.bfloat16)
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
    x = torch.randn(2, 5, 32, dtype=torch.bfloat16)
    grad = torch.randn(2, 48, 5, dtype=torch.bfloat16).transpose(1, 2)  # not contiguous, as a backward may give
    outputs, grads = [], []
    for fn in (lambda x: torch.nn.functional.linear(x, weight, bias), lambda x: _PackedLinear.apply(x, packed, bias)):
        x_ = x.clone().requires_grad_()
        out = fn(x_)
        out.backward(grad)
        outputs.append(out.detach())
        grads.append(x_.grad)
    assert torch.equal(*outputs) and torch.equal(*grads)


@needs_bf16
def test_an_update_runs_through_the_packed_copy_and_saving_its_adapter_unpacks_nothing(tokenizer, monkeypatch,
                                                                                      tmp_path):
    """A bf16 update runs under bf16 autocast: its forwards and backward must still read the packed copy (else
    every step unpacks every weight, and autograd keeps the unpacked copies), and PEFT's save must not take the
    whole model's state dict (which unpacks every weight)."""
    from rosa2_dspy.engine import prepack

    counts = {"packed": 0, "unpacked": 0}
    apply, dense = prepack._PackedLinear.apply, prepack._Placeholder.dense
    monkeypatch.setattr(prepack._PackedLinear, "apply",
                        lambda *a: counts.__setitem__("packed", counts["packed"] + 1) or apply(*a))
    monkeypatch.setattr(prepack._Placeholder, "dense",
                        lambda self: counts.__setitem__("unpacked", counts["unpacked"] + 1) or dense(self))
    engine = bf16_engine(tokenizer, prepack=True)
    config = UpdateConfig(objective="apo_zero_unpaired", beta=0.5, steps=1, batch_size=1, learning_rate=1e-2,
                          max_length=128)
    LoRAUpdater(engine, config).update([kto_row(PROMPT, "I think it is 7 or so", False)])
    assert counts["packed"] >= 14 and counts["unpacked"] == 0, counts
    engine.save_adapter(tmp_path / "adapter")
    assert counts["unpacked"] == 0 and (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    saved = engine.adapter_state()
    expected = {k: v.detach().clone() for k, v in saved.items()}
    engine.reset_adapter()
    engine.load_adapter(tmp_path / "adapter")
    assert all(torch.equal(engine.adapter_state()[k], expected[k]) for k in expected)


@needs_fp32
def test_float32_prepacking_rounds_differently_but_computes_the_same_model(tokenizer):
    engine = LocalEngine(make_tiny_model(tokenizer, init=0.2), tokenizer, name="tiny", prepack=False)
    ids = engine.encode_chat(PROMPT)
    plain = logits(engine, ids)
    engine.set_prepack(True)
    assert engine.prepacked and packed_count(engine.model) == 15
    torch.testing.assert_close(logits(engine, ids), plain, rtol=1e-4, atol=1e-4)


def test_prepacking_a_model_this_build_cannot_pack_is_refused(tokenizer):
    model = make_tiny_model(tokenizer).to(torch.float16)
    with pytest.raises(ValueError, match="prepack: float16 weights on cpu cannot be prepacked"):
        LocalEngine(model, tokenizer, name="tiny-fp16", prepack=True)
    assert not LocalEngine(model, tokenizer, name="tiny-fp16").prepacked


@needs_fp32
def test_a_float32_run_prepacked_has_its_own_identity_and_a_bf16_one_does_not():
    """Run folders refuse to mix answers that round differently: float32 prepacked weights (the default) do, bf16
    ones do not (so a bf16 run resumes with or without them)."""
    from argparse import Namespace

    from rosa2_dspy.cli.common import model_identity

    def identity(dtype, prepack):
        return model_identity(Namespace(model="tiny", device="cpu", dtype=dtype, batching="continuous",
                                        prepack=prepack))

    assert identity("float32", None) == identity("float32", True) == {**identity("float32", False), "prepack": True}
    assert identity("float32", False)["prepack"] is False
    if supported("cpu", torch.bfloat16):
        assert identity("bfloat16", True) == identity("bfloat16", False) == identity("bfloat16", None)


@needs_fp32
def test_float32_prepacked_greedy_rows_equal_their_unbatched_replies(tokenizer):
    """Issue 14's float32 guarantee holds with prepacked weights (float32's default since session 30): greedy rows of a
    continuously batched run, joining and leaving, equal each prompt's unbatched reply token for token, both through
    the packed copy. (Against the plain weights they may not: the packed product rounds differently.)"""
    from rosa2_dspy.engine.continuous import Row
    from test_decode import _alone, _decoder, _prompts

    engine = LocalEngine(make_tiny_model(tokenizer, init=0.2), tokenizer, name="tiny", prepack=True)
    assert engine.prepacked and packed_count(engine.model) == 15
    prompts = _prompts(engine, 6)
    budgets = [3, 17, 9, 25, 5, 12]
    rows = _decoder(engine, max_rows=3).run([Row(ids, budget) for ids, budget in zip(prompts, budgets)])
    assert len({tuple(r.generated[:3]) for r in rows}) > 1
    for row, ids, budget in zip(rows, prompts, budgets):
        assert row.generated == _alone(engine, ids, budget)
