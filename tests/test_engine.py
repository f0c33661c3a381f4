import threading
import time
from dataclasses import replace

import dspy
import pytest
import torch

from rosa2_dspy.engine import GenSettings, LocalEngine, usage_scope
from tests.conftest import make_tiny_model

GREEDY = GenSettings(max_tokens=12, do_sample=False, temperature=0.0, top_p=None, top_k=None, seed=None)


def chat(engine, text):
    return engine.encode_chat([{"role": "user", "content": text}])


def test_answers_through_dspy_predict(tiny_engine):
    dspy.configure(lm=tiny_engine.lm(cache=False, max_tokens=8), adapter=dspy.ChatAdapter())
    lm = dspy.settings.lm
    out = lm("hello")
    assert isinstance(out, list) and isinstance(out[0], str)
    assert lm.history[-1]["usage"]["completion_tokens"] <= 8
    assert lm.model.startswith("local/tiny@")


def test_batched_greedy_equals_unbatched(tiny_engine):
    prompts = [chat(tiny_engine, t) for t in ("hi", "what is two plus two, tell me please", "a b c d e f g h")]
    batched = tiny_engine.generate_batch(prompts, GREEDY)
    single = [tiny_engine.generate_batch([p], GREEDY)[0] for p in prompts]
    assert [b.text for b in batched] == [s.text for s in single]
    assert [b.output_tokens for b in batched] == [s.output_tokens for s in single]
    assert all(b.input_tokens == len(p) for b, p in zip(batched, prompts))


def test_max_tokens_stop_and_finish_reason(tiny_engine):
    long = tiny_engine.generate_batch([chat(tiny_engine, "x")], GREEDY)[0]
    assert long.output_tokens <= 12
    assert long.finish_reason in {"length", "stop"}
    stop_at = long.text[2:5]
    if stop_at.strip():
        stopped = tiny_engine.generate_batch([chat(tiny_engine, "x")], GREEDY, [(stop_at,)])[0]
        assert stop_at not in stopped.text and long.text.startswith(stopped.text)
        assert stopped.finish_reason == "stop"


def test_seeded_sampling_is_reproducible_and_n_gives_several(tiny_engine):
    lm = tiny_engine.lm(cache=False, max_tokens=10, temperature=1.0)
    a = lm("tell me a story", seed=7)
    b = lm("tell me a story", seed=7)
    assert a == b
    many = lm("tell me a story", n=4)
    assert len(many) == 4 and len(set(many)) > 1


def test_concurrent_callers_get_their_own_answers_and_are_batched(tiny_engine):
    lm = tiny_engine.lm(cache=False, max_tokens=10)
    questions = [f"question number {i}" for i in range(8)]
    ten = GenSettings(max_tokens=10, do_sample=False, temperature=0.0, top_p=None, top_k=None, seed=None)
    expected = {q: tiny_engine.generate_batch([chat(tiny_engine, q)], ten)[0].text for q in questions}
    got, usage = {}, {}
    barrier = threading.Barrier(len(questions))

    def call(q):
        barrier.wait()
        with usage_scope() as counter:
            got[q] = lm(q)[0]
        usage[q] = dict(counter)

    threads = [threading.Thread(target=call, args=(q,)) for q in questions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == expected
    assert all(u["calls"] == 1 and u["input_tokens"] > 0 for u in usage.values())
    assert tiny_engine.stats["max_batch_seen"] > 1


def test_incompatible_settings_are_not_mixed(tiny_engine):
    seen = []
    original = tiny_engine.generate_batch

    def spy(prompts, settings, *args, **kwargs):  # the engine's own call shape, whatever its extra arguments
        texts = [tiny_engine.tokenizer.decode(p) for p in prompts]
        seen.append((settings.do_sample, sorted(t for t in ("g0", "g1", "s0", "s1") if any(t in x for x in texts))))
        return original(prompts, settings, *args, **kwargs)

    tiny_engine.generate_batch = spy
    tiny_engine.batch_window = 0.3  # both pairs arrive inside one window
    greedy, hot = tiny_engine.lm(cache=False, max_tokens=6), tiny_engine.lm(cache=False, max_tokens=6, temperature=1.0)
    barrier = threading.Barrier(4)

    def run(lm, text):
        barrier.wait()
        lm(text)

    threads = [threading.Thread(target=run, args=args) for args in
               [(greedy, "g0"), (hot, "s0"), (greedy, "g1"), (hot, "s1")]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # each greedy pair and sampled pair ran as one batch of its own kind: none mixed, none split
    assert sorted(seen) == [(False, ["g0", "g1"]), (True, ["s0", "s1"])]


def test_one_failing_request_fails_only_itself(tiny_engine):
    original = tiny_engine.generate_batch
    calls = []

    def flaky(prompts, settings, *args, **kwargs):
        calls.append(len(prompts))
        if any(p[-1] == -1 for p in prompts):
            raise RuntimeError("bad request")
        return original(prompts, settings, *args, **kwargs)

    tiny_engine.generate_batch = flaky
    good, bad = chat(tiny_engine, "fine"), chat(tiny_engine, "broken") + [-1]
    from rosa2_dspy.engine import _Job

    jobs = [_Job(good, GREEDY, ()), _Job(bad, GREEDY, ()), _Job(good, GREEDY, ())]
    tiny_engine._run(jobs)
    assert calls == [3, 1, 1, 1]  # the batch failed on the bad request, then each ran alone
    assert jobs[0].future.result().text == jobs[2].future.result().text
    with pytest.raises(RuntimeError, match="bad request"):
        jobs[1].future.result()


def test_refusing_fails_what_the_engine_holds_and_then_serves_again(tiny_engine):
    """An interrupted run lets its threads go inside engine.refusing(): each request waiting on the engine fails
    at once (not when its long generation ends), new requests and weight updates are refused, the abandoned
    rows leave the running batch, and once closed the engine answers as before."""
    from rosa2_dspy.engine import EngineStopped

    tiny_engine.set_batching(continuous=True)
    endless = replace(GREEDY, max_tokens=1500)
    with tiny_engine.weights_lock:  # the worker cannot take a step: the requests wait, queued or about to join
        waiting = [tiny_engine.submit(chat(tiny_engine, text), endless) for text in ("a", "b c", "d e f")]
        time.sleep(0.3)
        with tiny_engine.refusing("the run is being stopped", settle=0):  # (this thread holds the worker's lock)
            for future in waiting:
                assert isinstance(future.exception(timeout=5), EngineStopped)
            assert isinstance(tiny_engine.submit(chat(tiny_engine, "g"), GREEDY).exception(timeout=0), EngineStopped)
            with pytest.raises(EngineStopped, match="being stopped"), tiny_engine.updating():
                pass
    time.sleep(0.5)  # the lock is free: a step for the rows that were about to join, then they leave
    steps = tiny_engine.stats["steps"]
    time.sleep(0.5)
    assert tiny_engine.stats["steps"] == steps <= 1  # (kept, they would decode 1,500 steps)
    prompt = [{"role": "user", "content": "h"}]
    expected = tiny_engine.generate_batch([tiny_engine.encode_chat(prompt)], GREEDY)[0].text
    assert tiny_engine.generate_one(prompt, GREEDY).text == expected


def test_refusing_returns_once_the_worker_has_left_its_step(lively_engine):
    """Closing refusing() waits until the worker has ended the decode step under way and dropped the let-go rows:
    a process that exits while the worker is still inside torch aborts (exit 134, not the run's 143)."""
    lively_engine.set_batching(continuous=True)
    stepping = threading.Event()

    def slow_step(module, args):
        stepping.set()
        time.sleep(0.3)

    handle = lively_engine.model.register_forward_pre_hook(slow_step)
    try:
        future = lively_engine.submit(chat(lively_engine, "a"), replace(GREEDY, max_tokens=1500))
        assert stepping.wait(10)
        with lively_engine.refusing("the run is being stopped"):
            pass
        assert future.done() and lively_engine._worker_idle.is_set()  # idle: waiting for the next request
        steps = lively_engine.stats["steps"]
        time.sleep(0.4)
        assert lively_engine.stats["steps"] == steps
    finally:
        handle.remove()


EXIT_DURING_DECODE = """
import sys, threading, time
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from rosa2_dspy.engine import EngineStopped, LocalEngine
tok = AutoTokenizer.from_pretrained(sys.argv[1])
torch.manual_seed(0)
config = LlamaConfig(vocab_size=len(tok), hidden_size=512, intermediate_size=2048, num_hidden_layers=4,
                     num_attention_heads=8, num_key_value_heads=4, initializer_range=0.2,
                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
engine = LocalEngine(LlamaForCausalLM(config).eval(), tok, name="big", continuous=True)
ids = engine.encode_chat([{"role": "user", "content": "hello"}])
from rosa2_dspy.engine import GenSettings
futures = [engine.submit(ids, GenSettings(max_tokens=3000, do_sample=False, temperature=0.0, top_p=None, top_k=None,
                                          seed=None)) for _ in range(4)]
deadline = time.monotonic() + 120
while engine.stats["steps"] < 3 and time.monotonic() < deadline:
    time.sleep(0.05)
with engine.refusing("stopped"):
    pass
sys.exit(143)
"""


def test_a_process_exits_cleanly_right_after_refusing(tokenizer, tmp_path):
    """The failure the wait above prevents, as a run saw it: SIGTERM during a compile's decoding, and the process
    aborted at exit ("terminate called without an active exception", 134) instead of exiting with 143."""
    import subprocess
    import sys

    script = tmp_path / "exit_during_decode.py"
    script.write_text(EXIT_DURING_DECODE)
    done = subprocess.run([sys.executable, str(script), tokenizer.name_or_path], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 143 and "terminate called" not in done.stderr, done.stderr[-500:]


def test_one_copy_of_weights_under_evaluate_threads(tiny_engine):
    dspy.configure(lm=tiny_engine.lm(cache=False, max_tokens=6), adapter=dspy.ChatAdapter())
    before = {id(p) for p in tiny_engine.model.parameters()}
    examples = [dspy.Example(question=f"q{i}", answer="x").with_inputs("question") for i in range(6)]
    evaluate = dspy.Evaluate(devset=examples, metric=lambda e, p, t=None: 0.0, num_threads=4,
                             display_progress=False, provide_traceback=False)
    evaluate(dspy.Predict("question -> answer"))
    assert {id(p) for p in tiny_engine.model.parameters()} == before
    assert tiny_engine.stats["requests"] >= 6


def test_cache_never_returns_an_answer_from_other_weights(tiny_engine, tmp_path):
    import uuid

    prompt = f"cache me {uuid.uuid4().hex}"  # DSPy's disk cache outlives the test run
    lm = tiny_engine.lm(cache=True, max_tokens=8)
    first = lm(prompt)[0]
    calls = tiny_engine.stats["requests"]
    assert lm(prompt)[0] == first and tiny_engine.stats["requests"] == calls  # served from cache
    tiny_engine.attach_adapter()
    assert lm(prompt)[0] == first  # a fresh adapter is zero shift: same weights, cache still valid
    with torch.no_grad():
        for name, tensor in tiny_engine.adapter_state().items():
            if "lora_B" in name:
                tensor.normal_(0, 0.5)
    tiny_engine.mark_changed()
    lm(prompt)
    assert tiny_engine.stats["requests"] == calls + 1  # other weights: generated again, not cached
    tiny_engine.reset_adapter()
    assert lm(prompt)[0] == first


def test_adapter_slot_snapshot_restore_save_load(tiny_engine, tmp_path):
    version = tiny_engine.version
    tiny_engine.attach_adapter()
    assert tiny_engine.version > version
    snap = tiny_engine.snapshot()
    with torch.no_grad():
        for tensor in tiny_engine.adapter_state().values():
            tensor.add_(0.1)
    tiny_engine.mark_changed()
    changed = tiny_engine.snapshot()
    saved = tiny_engine.save_adapter(tmp_path / "adapter")
    assert (saved / "adapter_model.safetensors").is_file()
    tiny_engine.restore(snap)
    assert all(torch.equal(tiny_engine.adapter_state()[k], snap[k]) for k in snap)
    tiny_engine.load_adapter(saved)
    assert all(torch.equal(tiny_engine.adapter_state()[k], changed[k]) for k in changed)
    tiny_engine.reset_adapter()
    assert all(torch.count_nonzero(t) == 0 for k, t in tiny_engine.adapter_state().items() if "lora_B" in k)


def test_save_adapter_is_atomic_when_it_fails(tiny_engine, tmp_path, monkeypatch):
    tiny_engine.attach_adapter()
    target = tiny_engine.save_adapter(tmp_path / "adapter")
    before = (target / "adapter_model.safetensors").read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(tiny_engine.peft_model, "save_pretrained", boom)
    with pytest.raises(OSError):
        tiny_engine.save_adapter(target)
    assert (target / "adapter_model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_engines_from_different_weights_have_different_ids(tokenizer):
    a = LocalEngine(make_tiny_model(tokenizer, seed=1), tokenizer, name="tiny")
    b = LocalEngine(make_tiny_model(tokenizer, seed=2), tokenizer, name="tiny")
    assert a.lm().model != b.lm().model


def test_identical_requests_beyond_one_batch_all_complete(tiny_engine):
    tiny_engine.max_batch = 2
    lm = tiny_engine.lm(cache=False, max_tokens=4)
    results, barrier = [], threading.Barrier(5)

    def call():
        barrier.wait()
        results.append(lm("the same question")[0])

    threads = [threading.Thread(target=call, daemon=True) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == 5 and len(set(results)) == 1


def test_sampled_n_candidates_run_in_one_batch(tiny_engine):
    lm = tiny_engine.lm(max_tokens=6, temperature=1.0, cache=False)
    tiny_engine.batch_window = 0.25  # thread start-up under a loaded CI machine must not split the batch
    before = dict(tiny_engine.stats)
    outputs = lm(messages=[{"role": "user", "content": "Say something."}], n=4)
    assert len(outputs) == 4
    assert tiny_engine.stats["requests"] - before["requests"] == 4
    assert tiny_engine.stats["batches"] - before["batches"] < 4  # not one generate per candidate
    assert len(set(map(str, outputs))) > 1  # distinct samples, not one answer repeated
    assert len(lm(messages=[{"role": "user", "content": "Say something."}], n=1)) == 1


def _pin_random_adapter(engine, seed: int) -> str:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in engine.adapter_state().items():
            if "lora_B" in name:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 2.0)
    engine.mark_changed()
    return engine.pin()


def test_rows_with_different_weights_share_a_batch_and_match_unbatched(tiny_engine):
    from concurrent.futures import wait

    from rosa2_dspy.engine import GenSettings

    tiny_engine.attach_adapter()
    base = tiny_engine.pin()  # zero-shift adapter = the base model
    pins = [base, _pin_random_adapter(tiny_engine, 1), _pin_random_adapter(tiny_engine, 2)]
    current = _pin_random_adapter(tiny_engine, 3)  # the weights in use while the others are served
    prompt = tiny_engine.encode_chat([{"role": "user", "content": "Count to five."}])
    greedy = GenSettings(max_tokens=8, do_sample=False, temperature=0.0, top_p=None, top_k=None, seed=None)
    alone = {}
    for ident in pins + [current]:
        tiny_engine.use_pinned(ident)
        alone[ident] = tiny_engine.generate_batch([prompt], greedy)[0].text
    assert len(set(alone.values())) > 1  # the adapters really answer differently
    tiny_engine.use_pinned(current)
    state_before = tiny_engine.snapshot()
    tiny_engine.batch_window = 0.25
    before = dict(tiny_engine.stats)
    futures = {ident: tiny_engine.submit(prompt, GenSettings(**{**greedy.__dict__, "weights": ident}))
               for ident in pins + [current]}
    wait(list(futures.values()), timeout=60)
    assert {ident: f.result().text for ident, f in futures.items()} == alone
    assert tiny_engine.stats["batches"] - before["batches"] == 1
    assert tiny_engine.stats["mixed_weights_batches"] - before["mixed_weights_batches"] == 1
    # rows were served from the pinned tensors: the trainable adapter, its id and what gets saved are
    # untouched, it is switched back on and trainable, and no serving hook is left behind
    from rosa2_dspy.engine import lora_layers

    assert tiny_engine.weights_id == current
    assert all(torch.equal(t, state_before[k]) for k, t in tiny_engine.adapter_state().items())
    assert list(tiny_engine.peft_model.peft_config) == ["default"]
    layers = lora_layers(tiny_engine.peft_model).values()
    assert not any(layer._forward_hooks or layer.disable_adapters for layer in layers)
    assert all(p.requires_grad for p in tiny_engine.adapter_state().values())
    tiny_engine.unpin(pins[1])
    with pytest.raises(ValueError, match="never pinned"):
        tiny_engine.use_pinned(pins[1])


def test_per_row_updates_of_a_bf16_model_run_in_bf16_and_match_each_row_alone(tokenizer):
    """In a bf16 model the rows' own low-rank updates are computed in bf16, where PEFT would cast the activations
    to its float32 adapter (a quarter of a 1.5B decode step): each row's logits still match its weights alone,
    and the LoRA layers are on again afterwards, or still off when they were off before."""
    from rosa2_dspy.engine import lora_layers

    engine = LocalEngine(make_tiny_model(tokenizer, init=0.2).to(torch.bfloat16), tokenizer, name="tiny-bf16")
    engine.attach_adapter()
    pins = [_pin_random_adapter(engine, seed) for seed in (1, 2)]
    prompts = [chat(engine, "Count to five."), chat(engine, "Name a colour.")]
    width = max(map(len, prompts))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = (torch.arange(width) >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()

    def logits():
        with torch.inference_mode():
            return engine.model(input_ids=ids, attention_mask=mask).logits[:, -1].float()

    alone = []
    for i, ident in enumerate(pins):
        engine.use_pinned(ident)
        alone.append(logits()[i])
    with engine._per_row_adapters(pins):
        mixed = logits()
    grouped = engine._grouped_adapters(tuple(pins))
    assert {a.dtype for _, a, b in grouped} | {b.dtype for _, a, b in grouped} == {torch.bfloat16}
    for i in range(2):
        torch.testing.assert_close(mixed[i], alone[i], rtol=0.05, atol=0.05 * float(alone[i].abs().max()))
    assert not (mixed[0] - alone[1]).abs().max() < 0.05 * float(alone[1].abs().max()), "the rows' weights differ"
    layers = list(lora_layers(engine.peft_model).values())
    assert not any(layer.disable_adapters for layer in layers)
    with engine.adapter_disabled():
        with engine._per_row_adapters(pins):
            logits()
        assert all(layer.disable_adapters for layer in layers), "nested: left off as found"
    assert not any(layer.disable_adapters for layer in layers)


def test_a_seeded_sample_repeats_whatever_batch_it_lands_in(tiny_engine):
    from rosa2_dspy.engine import GenSettings

    prompt = tiny_engine.encode_chat([{"role": "user", "content": "Say something."}])
    other = tiny_engine.encode_chat([{"role": "user", "content": "Something else, longer than that."}])
    sampled = GenSettings(max_tokens=8, do_sample=True, temperature=1.0, top_p=0.95, top_k=None, seed=None)
    alone = tiny_engine.generate_batch([prompt], sampled, seeds=[7])[0].text
    mixed = tiny_engine.generate_batch([other, prompt, prompt], sampled, seeds=[1, 7, 8])
    assert mixed[1].text == alone and mixed[2].text != alone


def test_announced_updates_go_first_and_the_requests_behind_them_run_as_one_batch(tiny_engine):
    """Plain weights_lock alternates update / tiny batch / update; announced updates land back to back."""
    import time

    prompt = chat(tiny_engine, "Count to five.")
    order, holding, release = [], {1: threading.Event(), 2: threading.Event()}, {1: threading.Event(),
                                                                                  2: threading.Event()}

    def update(n):
        with tiny_engine.updating():
            order.append(f"update {n}")
            holding[n].set()
            release[n].wait(30)

    before = dict(tiny_engine.stats)
    first = threading.Thread(target=update, args=(1,), daemon=True)
    first.start()
    assert holding[1].wait(10)
    early = tiny_engine.submit(prompt, GREEDY)  # queued while update 1 runs
    early.add_done_callback(lambda _: order.append("early"))
    second = threading.Thread(target=update, args=(2,), daemon=True)
    second.start()  # announced; waits for the lock behind update 1
    time.sleep(0.2)
    release[1].set()
    assert holding[2].wait(10)
    late = tiny_engine.submit(prompt, GREEDY)  # queued while update 2 runs
    time.sleep(0.2)
    assert not early.done()
    release[2].set()
    assert early.result(timeout=60).text == late.result(timeout=60).text
    first.join(10), second.join(10)
    assert order == ["update 1", "update 2", "early"]
    assert tiny_engine.stats["batches"] - before["batches"] == 1
    assert tiny_engine.stats["waits_for_updates"] > before["waits_for_updates"]


def test_holds_on_pinned_weights_do_not_wait_for_a_running_batch(tiny_engine):
    """A conversation starting or ending takes or releases a hold while a batch holds weights_lock."""
    tiny_engine.attach_adapter()
    ident = tiny_engine.pin()
    held, release, done = threading.Event(), threading.Event(), threading.Event()

    def generating():  # stands for the batching worker in the middle of a batch
        with tiny_engine.weights_lock:
            held.set()
            release.wait(30)

    worker = threading.Thread(target=generating, daemon=True)
    worker.start()
    assert held.wait(10)

    def conversation():
        tiny_engine.pin(ident)
        tiny_engine.pinned_state(ident)
        tiny_engine.unpin(ident)
        done.set()

    threading.Thread(target=conversation, daemon=True).start()
    try:
        assert done.wait(5)
    finally:
        release.set()
        worker.join(10)
    tiny_engine.unpin(ident)
    assert ident not in tiny_engine._pins


def test_the_weights_id_is_read_during_a_batch_and_never_stale_during_a_change(tiny_engine):
    tiny_engine.attach_adapter()
    before = tiny_engine.weights_id
    held, release, read = threading.Event(), threading.Event(), []

    def hold(change):
        with (tiny_engine.updating() if change else tiny_engine.weights_lock):
            if change:
                _randomize(tiny_engine, 5, mark=False)  # changed, not yet marked: mid-update
            held.set()
            release.wait(30)
            if change:
                tiny_engine.mark_changed()

    def reader():
        read.append(tiny_engine.weights_id)

    for change in (False, True):  # a batch in progress, then an update in progress
        held.clear(), release.clear(), read.clear()
        holder = threading.Thread(target=hold, args=(change,), daemon=True)
        holder.start()
        assert held.wait(10)
        other = threading.Thread(target=reader, daemon=True)
        other.start()
        other.join(2)
        if change:
            assert not read  # no stale id while the weights change: the reader waits for the update
        else:
            assert read == [before]  # a valid cached id needs no lock
        release.set()
        holder.join(10), other.join(10)
    assert read and read[0] != before and read[0] == tiny_engine.weights_id


def _randomize(engine, seed: int, mark: bool = True) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in engine.adapter_state().items():
            if "lora_B" in name:
                tensor.copy_(torch.randn(tensor.shape, generator=generator))
    if mark:
        engine.mark_changed()


def test_the_batch_window_stays_open_while_requests_keep_arriving(tiny_engine):
    import time

    tiny_engine.batch_window, tiny_engine.batch_window_max = 0.1, 2.0
    prompt = chat(tiny_engine, "Count to five.")
    before = dict(tiny_engine.stats)
    futures = []
    for _ in range(4):  # 4 callers 50 ms apart: 150 ms in all, past the first 100 ms window
        futures.append(tiny_engine.submit(prompt, GREEDY))
        time.sleep(0.05)
    assert len({f.result(timeout=60).text for f in futures}) == 1
    assert tiny_engine.stats["batches"] - before["batches"] == 1
    assert tiny_engine.stats["max_batch_seen"] >= 4


@pytest.mark.parametrize("continuous", [False, True])
def test_the_output_head_sees_a_dense_last_position_with_an_adapter_attached(tiny_engine, continuous):
    """generate and the continuous decoder slice the last position for the head; with PEFT's frozen head weight
    a strided slice made matmul copy the whole head per row (a 5-row prefill of the 1.5B model: 19.6 s instead
    of 2.3 s; one row joining the running batch: 3.4 s for its logits). One row's slice passes is_contiguous(),
    so the strides themselves are checked: dense, as matmul's folding test wants them."""
    from rosa2_dspy.engine.generation import _dense_strides

    tiny_engine.attach_adapter()
    tiny_engine.set_batching(continuous)
    seen = []
    head = tiny_engine.model.get_output_embeddings()
    handle = head.register_forward_hook(lambda module, args, out: seen.append(
        (args[0].stride() == _dense_strides(args[0].shape), args[0].shape[:2])))
    try:
        if continuous:  # one row joins, then two at once
            tiny_engine.submit(chat(tiny_engine, "a longer prompt"), GREEDY).result(timeout=60)
            futures = [tiny_engine.submit(chat(tiny_engine, text), GREEDY) for text in ("a", "a longer prompt")]
            [future.result(timeout=60) for future in futures]
        else:
            tiny_engine.generate_batch([chat(tiny_engine, "a longer prompt")], GREEDY)
            tiny_engine.generate_batch([chat(tiny_engine, "a"), chat(tiny_engine, "a longer prompt")], GREEDY)
    finally:
        handle.remove()
    assert seen and all(dense and positions == 1 for dense, (rows, positions) in seen), seen
    assert 1 in {rows for _, (rows, _) in seen}


def test_every_pin_is_released_by_its_owner(tiny_engine):
    import copy
    import gc

    from math_solver import MathSolver

    lm = tiny_engine.lm(pinned=True, max_tokens=4, cache=False)
    ident = lm.pinned_weights
    assert tiny_engine.pin_holds() == {ident: 1}
    twin, deep = lm.copy(), copy.deepcopy(lm)  # each copy takes its own hold
    program = MathSolver()
    program.set_lm(lm)
    clone = program.deepcopy()
    assert twin.pinned_weights == deep.pinned_weights == ident
    copies = {id(p.lm) for p in clone.predictors()}  # the clone's predictors share one copy of the LM
    assert len(copies) == 1 and tiny_engine.pin_holds()[ident] == 4
    twin.close()
    twin.close()  # idempotent
    assert twin.pinned_weights is None and tiny_engine.pin_holds()[ident] == 3
    del deep, clone
    gc.collect()  # an owner nobody closed releases its hold when it is collected
    assert tiny_engine.pin_holds() == {ident: 1}
    with lm:
        pass
    assert tiny_engine.pin_holds() == {}


def test_finetuning_and_sessions_leave_no_pins_behind(tiny_engine):
    import gc

    import dspy
    from math_solver import MathSolver

    from rosa2_dspy.coadapt import Session, SessionConfig
    from rosa2_dspy.math.users import OracleUser
    from rosa2_dspy.weights import LoRAFinetune, UpdateConfig, local_finetunable_lm

    lm = local_finetunable_lm(tiny_engine, max_tokens=4, cache=False)
    dspy.configure(lm=lm)
    train = [dspy.Example(problem="What is 2+3?", answer="5", solution="\\boxed{5}",
                          unique_id=f"t{i}").with_inputs("problem") for i in range(2)]
    tuner = LoRAFinetune(lambda *a, **k: 1.0, config=UpdateConfig(objective="sft", steps=1, batch_size=2,
                                                                  max_length=64), num_threads=1)
    compiled = tuner.compile(MathSolver(), trainset=train)
    ident = compiled.predictors()[0].lm.pinned_weights
    assert ident and tiny_engine.pin_holds() == {ident: 1}  # held by the compiled program's LM only
    with Session(compiled, tiny_engine, "ttt", OracleUser(), SessionConfig(turns=2, samples=0, max_tokens=4)) as s:
        s.run(train[0])
    assert tiny_engine.pin_holds() == {ident: 1}  # the session and its conversation let go
    del compiled, s
    gc.collect()
    assert tiny_engine.pin_holds() == {}


def test_identical_greedy_requests_for_pinned_weights_in_flight_are_generated_once(tiny_engine):
    weights = tiny_engine.pin()
    pinned = GenSettings(max_tokens=12, do_sample=False, temperature=0.0, top_p=None, top_k=None, seed=None,
                         weights=weights)
    prompt, other = chat(tiny_engine, "the same question"), chat(tiny_engine, "another question")
    before = dict(tiny_engine.stats)
    futures = [tiny_engine.submit(prompt, pinned) for _ in range(4)] + [tiny_engine.submit(other, pinned)]
    done = [f.result(timeout=60) for f in futures]
    assert tiny_engine.stats["requests"] - before["requests"] == 2  # one per distinct prompt
    assert tiny_engine.stats["joined"] - before["joined"] == 3
    assert len({c.text for c in done[:4]}) == 1
    assert done[0].text == tiny_engine.generate_batch([prompt], pinned)[0].text
    assert not done[0].shared and done[0].output_tokens > 0
    assert all(c.shared and c.output_tokens == 0 and c.compute_seconds == 0 for c in done[1:4])
    # once it has finished, the same request generates again; sampled or unpinned requests never join
    again = tiny_engine.submit(prompt, pinned).result(timeout=60)
    assert not again.shared and again.text == done[0].text
    sampled = replace(pinned, do_sample=True, temperature=1.0, seed=3)
    unpinned = replace(pinned, weights=None)
    before = dict(tiny_engine.stats)
    for f in [tiny_engine.submit(prompt, s) for s in (sampled, sampled, unpinned, unpinned)]:
        f.result(timeout=60)
    assert tiny_engine.stats["joined"] == before["joined"]
    assert tiny_engine.stats["requests"] - before["requests"] == 4
    tiny_engine.unpin(weights)


@pytest.mark.parametrize("continuous", [False, True])
def test_rows_on_the_base_weights_skip_the_zero_adapter_and_answer_as_before(tiny_engine, continuous):
    """A fresh adapter's update is zero, so a batch on the base weights runs with the adapter switched off (PEFT
    computed every zero update: a third of a one-row prefill of the 1.5B model), answering exactly as without
    one; once the adapter moves, its LoRA layers run again."""
    prompts = [chat(tiny_engine, "a"), chat(tiny_engine, "a longer prompt")]

    def answers():
        if not continuous:
            return [c.text for c in tiny_engine.generate_batch(prompts, GREEDY)]
        futures = [tiny_engine.submit(p, GREEDY) for p in prompts]
        return [f.result(timeout=60).text for f in futures]

    tiny_engine.set_batching(continuous)
    plain = answers()
    tiny_engine.attach_adapter()
    calls = []
    lora_a = next(m for name, m in tiny_engine.peft_model.named_modules() if name.endswith("lora_A.default"))
    handle = lora_a.register_forward_hook(lambda *args: calls.append(1))
    try:
        assert answers() == plain and calls == []
        with torch.no_grad():
            for name, tensor in tiny_engine.adapter_state().items():
                if "lora_B" in name:
                    tensor.add_(0.01)
        tiny_engine.mark_changed()
        answers()
        assert calls, "an adapter that moved is computed"
    finally:
        handle.remove()


def test_a_run_answers_a_greedy_request_it_already_answered_from_its_memory(tiny_engine, tmp_path):
    """A run stopped and resumed in another process answers a request it already answered (a problem's turn 1
    for a method whose conversation runs in the later segment) from its file, not by generating it again in
    other batches; sampled requests and requests outside a run are generated as always."""
    import json

    tiny_engine.attach_adapter()
    base = tiny_engine.pin()
    prompt = chat(tiny_engine, "Count to five.")
    pinned = replace(GREEDY, weights=base)
    path = tmp_path / "greedy.jsonl"
    with tiny_engine.remember_greedy(path):
        first = tiny_engine.submit(prompt, pinned).result(timeout=60)
        tiny_engine.submit(prompt, replace(pinned, do_sample=True, temperature=1.0, seed=1)).result(timeout=60)
    (line,) = path.read_text().splitlines()  # the greedy request only
    item = json.loads(line)
    assert item["completion"]["text"] == first.text and not first.shared
    item["completion"]["text"] = "FROM THE RUN'S MEMORY"
    path.write_text(json.dumps(item) + "\n" + '{"request": "torn')
    requests = tiny_engine.stats["requests"]
    with tiny_engine.remember_greedy(path):
        again = tiny_engine.submit(prompt, pinned).result(timeout=60)
        other = tiny_engine.submit(chat(tiny_engine, "Name a colour."), pinned).result(timeout=60)
    assert again.text == "FROM THE RUN'S MEMORY" and again.shared and again.output_tokens == 0
    assert not other.shared and tiny_engine.stats["requests"] == requests + 1
    assert tiny_engine.submit(prompt, pinned).result(timeout=60).text == first.text  # outside a run: generated
    assert len(path.read_text().splitlines()) == 3  # the torn line stays; the new request was appended
