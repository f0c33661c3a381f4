"""Continuous batching (rosa2_dspy.engine.continuous): rows joining and leaving a running batch between steps."""

import torch

from rosa2_dspy.engine.continuous import ContinuousDecoder, Row


def _prompts(engine, n):
    texts = ["What is 2+2?", "Name a prime.", "Say hello in French, please, and then count to five.",
             "x", "Write a haiku about the sea and the moon and the stars.", "1, 2, 3,"]
    return [engine.encode_chat([{"role": "user", "content": texts[i % len(texts)]}]) for i in range(n)]


def _alone(engine, ids, max_tokens):
    """Greedy tokens of one prompt through plain transformers generate, no batch, no padding."""
    with torch.inference_mode():
        out = engine.model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    max_new_tokens=max_tokens, do_sample=False, pad_token_id=engine.tokenizer.pad_token_id,
                                    eos_token_id=engine.eos_token_ids, temperature=None, top_p=None, top_k=None)
    new = out[0, len(ids):].tolist()
    for i, token in enumerate(new):
        if token in engine.eos_token_ids:
            return new[:i]
    return new


def _decoder(engine, max_rows):
    return ContinuousDecoder(engine.model, engine.tokenizer, engine.eos_token_ids, engine.tokenizer.pad_token_id,
                             max_rows=max_rows)


def test_greedy_rows_equal_their_unbatched_generate_while_rows_join_and_leave(lively_engine):
    prompts = _prompts(lively_engine, 6)
    budgets = [3, 17, 9, 25, 5, 12]  # rows end at different steps, so slots free up and refill mid-run
    rows = [Row(ids, budget) for ids, budget in zip(prompts, budgets)]
    decoder = _decoder(lively_engine, max_rows=3)
    joined_late = []
    waiting = list(rows)
    while waiting or decoder.rows:
        joining, waiting = waiting[: decoder.free], waiting[decoder.free:]
        if joining and decoder.rows:
            joined_late.append(len(joining))
        decoder.step(joining)
    assert joined_late, "no row ever joined a running batch: the test would not exercise the merge"
    assert len({tuple(r.generated[:3]) for r in rows}) > 1  # replies differ, so equality below means something
    for row, ids, budget in zip(rows, prompts, budgets):
        assert row.generated == _alone(lively_engine, ids, budget)
        assert row.finish == ("length" if len(row.generated) == budget else "stop")
    assert decoder.rows == [] and decoder.cache is None


def test_a_seeded_sampled_row_repeats_whichever_rows_run_beside_it(lively_engine):
    prompts = _prompts(lively_engine, 5)

    def sampled(ids):
        return Row(ids, 12, temperature=1.0, top_p=0.9, seed=1234)

    alone = _decoder(lively_engine, 4).run([sampled(prompts[0])])[0].generated
    crowd = [Row(p, n) for p, n in zip(prompts[1:], (4, 20, 7))] + [sampled(prompts[0])]
    beside = _decoder(lively_engine, 2).run(crowd)[-1].generated  # joins late, into a batch of others
    assert alone == beside and len(alone) > 0
    other_seed = Row(prompts[0], 12, temperature=1.0, top_p=0.9, seed=99)
    assert _decoder(lively_engine, 1).run([other_seed])[0].generated != alone


def test_stop_strings_cut_a_row_and_free_its_slot(lively_engine):
    ids = _prompts(lively_engine, 1)[0]
    free_run = _decoder(lively_engine, 2).run([Row(ids, 20)])[0]
    decoder = _decoder(lively_engine, 2)
    text = decoder.text_of(free_run)
    cut = next(i for i in range(len(text) // 2, len(text)) if text[i].strip())  # a visible character past the middle
    stop = text[cut]
    assert 0 < text.find(stop) < len(text) - 1, text
    row = decoder.run([Row(ids, 20, stop=(stop,))])[0]
    assert row.finish == "stop" and decoder.text_of(row) == text[: text.find(stop)]
    assert len(row.generated) < len(free_run.generated)


def test_more_joiners_than_free_slots_is_refused(lively_engine):
    import pytest

    decoder = _decoder(lively_engine, 1)
    with pytest.raises(ValueError, match="cannot join"):
        decoder.step([Row([1, 2], 3), Row([1, 2], 3)])


def _continuous(engine):
    from rosa2_dspy.engine import LocalEngine

    return LocalEngine(engine.model, engine.tokenizer, name="continuous", continuous=True)


def test_the_engine_serves_mixed_requests_continuously_with_the_answers_of_unbatched_runs(lively_engine):
    from concurrent.futures import wait

    from rosa2_dspy.engine import GenSettings

    prompts = _prompts(lively_engine, 6)
    greedy = GenSettings(max_tokens=10, do_sample=False, temperature=0.0, top_p=None, top_k=None, seed=None)
    sampled = GenSettings(max_tokens=7, do_sample=True, temperature=1.0, top_p=0.9, top_k=None, seed=5)
    requests = [(prompts[0], greedy), (prompts[1], sampled), (prompts[2], GenSettings(**{**greedy.__dict__,
                                                                                        "max_tokens": 3})),
                (prompts[3], greedy), (prompts[4], GenSettings(**{**sampled.__dict__, "seed": 6})),
                (prompts[5], GenSettings(**{**greedy.__dict__, "max_tokens": 25}))]
    alone = [lively_engine.generate_batch([p], s, seeds=[s.seed])[0] for p, s in requests]
    engine = _continuous(lively_engine)
    engine.max_batch = 4  # six requests, four slots: two join as the first ones end
    futures = [engine.submit(p, s) for p, s in requests]
    wait(futures, timeout=120)
    got = [f.result() for f in futures]
    assert [c.text for c in got] == [c.text for c in alone]
    assert [c.output_tokens for c in got] == [c.output_tokens for c in alone]
    assert [c.finish_reason for c in got] == [c.finish_reason for c in alone]
    assert engine.stats["requests"] == 6 and engine.stats["max_batch_seen"] == 4
    assert all(c.compute_seconds > 0 for c in got)


def test_continuous_rows_with_different_pinned_weights_match_each_alone(lively_engine):
    from concurrent.futures import wait

    from test_engine import _pin_random_adapter

    from rosa2_dspy.engine import GenSettings

    engine = _continuous(lively_engine)
    engine.attach_adapter()
    pins = [engine.pin(), _pin_random_adapter(engine, 1), _pin_random_adapter(engine, 2)]
    prompt = engine.encode_chat([{"role": "user", "content": "Count to five."}])
    greedy = GenSettings(max_tokens=8, do_sample=False, temperature=0.0, top_p=None, top_k=None, seed=None)
    alone = {}
    for ident in pins:
        engine.use_pinned(ident)
        alone[ident] = engine.generate_batch([prompt], greedy)[0].text
    assert len(set(alone.values())) == len(pins)
    futures = {ident: engine.submit(prompt, GenSettings(**{**greedy.__dict__, "weights": ident})) for ident in pins}
    wait(list(futures.values()), timeout=60)
    assert {ident: f.result().text for ident, f in futures.items()} == alone


def test_no_request_joins_while_an_update_is_announced(lively_engine):
    import threading
    import time

    from rosa2_dspy.engine import GenSettings

    engine = _continuous(lively_engine)
    prompt = _prompts(engine, 1)[0]
    greedy = GenSettings(max_tokens=4, do_sample=False, temperature=0.0, top_p=None, top_k=None, seed=None)
    expected = engine.submit(prompt, greedy).result(timeout=60).text
    holding, release = threading.Event(), threading.Event()

    def update():
        with engine.updating():
            holding.set()
            release.wait(30)

    thread = threading.Thread(target=update, daemon=True)
    thread.start()
    assert holding.wait(10)
    queued = engine.submit(prompt, greedy)
    time.sleep(0.3)
    assert not queued.done()  # waits for the update
    release.set()
    assert queued.result(timeout=60).text == expected
    thread.join(10)


def test_an_announced_update_lands_while_pinned_rows_pause_and_they_go_on_unchanged(lively_engine):
    """Running rows on pinned weights do not make an update wait for the longest of them to end (that drained
    the batch once per update): the rows pause, the update lands, and each row's reply is its reply alone."""
    import threading
    import time

    from test_engine import _pin_random_adapter

    from rosa2_dspy.engine import GenSettings

    engine = _continuous(lively_engine)
    engine.attach_adapter()
    weights = _pin_random_adapter(engine, 3)
    prompt = _prompts(engine, 1)[0]
    settings = GenSettings(max_tokens=30, do_sample=False, temperature=0.0, top_p=None, top_k=None, seed=None,
                           weights=weights)
    alone = engine.generate_batch([prompt], settings)[0]
    assert alone.output_tokens >= 20  # long enough to be interrupted
    steps, started, during_update = [], threading.Event(), []
    original = engine._rows_context

    def slow_steps(rows):  # each decode step takes 30 ms and says whether an update was announced
        steps.append(engine._updates_waiting)
        started.set()
        time.sleep(0.03)
        return original(rows)

    engine._rows_context = slow_steps
    future = engine.submit(prompt, settings)
    assert started.wait(30)
    with engine.updating():  # another conversation's update: the live adapter changes in place
        during_update.append(len(steps))
        _pin_random_adapter(engine, 4)
        time.sleep(0.1)
        during_update.append(len(steps))
    result = future.result(timeout=60)
    # the rows paused for it on purpose, not by winning the weights lock between two steps (a race that the
    # 1.5B model's second-long steps lose, step after step)
    assert engine.stats["waits_for_updates"] >= 1
    assert during_update[0] == during_update[1] <= 3  # it landed at once: no step ran while it held the weights
    assert len(steps) > during_update[1]  # and the row went on after it
    assert sum(1 for waiting in steps if waiting) <= 1  # at most the step already under way when it was announced
    assert (result.text, result.output_tokens) == (alone.text, alone.output_tokens)


def test_an_engine_switches_batching_after_serving_what_was_queued(lively_engine):
    """`LocalEngine.shared(..., continuous=...)` may meet an engine serving the other way (one process running
    several commands): the old worker serves every request queued before the switch, then the new one takes
    over."""
    from rosa2_dspy.engine import GenSettings

    engine = lively_engine
    prompts = _prompts(engine, 3)
    greedy = GenSettings(max_tokens=6, do_sample=False, temperature=0.0, top_p=None, top_k=None, seed=None)
    alone = [engine.generate_batch([p], greedy)[0].text for p in prompts]
    queued = [engine.submit(p, greedy) for p in prompts]  # padded batches
    engine.set_batching(True)
    assert [f.result(timeout=60).text for f in queued] == alone and engine.stats["batches"] >= 1
    batches = engine.stats["batches"]
    assert [engine.submit(p, greedy).result(timeout=60).text for p in prompts] == alone
    assert engine.continuous and engine.stats["batches"] == batches  # served continuously: no padded batch
    engine.set_batching(False)
    assert [engine.submit(p, greedy).result(timeout=60).text for p in prompts] == alone
    assert engine.stats["batches"] > batches


def test_a_decode_step_writes_its_column_into_the_cache_in_place(lively_engine):
    """transformers' DynamicLayer concatenates, copying every layer's cache at every step (a quarter of a 64-row
    step at 800 tokens); the decoder's cache keeps spare columns and writes the new one in place, until a row
    joins or leaves (the greedy-equality tests above hold with it)."""
    from rosa2_dspy.engine.continuous import CACHE_ROOM

    prompt = _prompts(lively_engine, 1)[0]
    decoder = _decoder(lively_engine, max_rows=2)
    decoder.step([Row(prompt, 50)])
    decoder.step([])  # the first decode step moves the prefilled cache into a buffer with room
    layer = decoder.cache.layers[0]
    buffer = layer.keys.untyped_storage().data_ptr()
    for _ in range(5):
        decoder.step([])
    assert layer.keys.shape[-2] == len(prompt) + 6
    assert layer.keys.untyped_storage().data_ptr() == buffer  # five steps, no new allocation
    assert layer.keys.untyped_storage().nbytes() >= (len(prompt) + CACHE_ROOM) * layer.keys[0, 0, 0].nbytes
    decoder.step([Row(prompt, 3)])  # a row joins: a new cache, then a new buffer with room
    decoder.step([])
    assert decoder.cache.layers[0].keys.shape[0] == 2


def test_a_row_leaving_or_joining_frees_the_cache_it_replaces(lively_engine):
    """After rows leave (or join), each cache layer holds only the running cache: the buffers it replaced are let
    go at once, not kept until the next step (a weight update runs in between, so they would add a whole cache to
    its peak memory). The replies stay those of unbatched generate."""
    prompts = _prompts(lively_engine, 4)
    budgets = [2, 9, 4, 9]
    rows = [Row(ids, budget) for ids, budget in zip(prompts, budgets)]
    decoder = _decoder(lively_engine, max_rows=3)
    waiting, checked = list(rows), {"left": 0, "joined": 0}
    while waiting or decoder.rows:
        before = len(decoder.rows)
        joining, waiting = waiting[: decoder.free], waiting[decoder.free:]
        finished = decoder.step(joining)
        if decoder.rows and (finished or (joining and before)):
            checked["left" if finished else "joined"] += 1
            for layer in decoder.cache.layers:
                room = getattr(layer, "_room", None)
                assert room is None or (room[0].data_ptr() == layer.keys.data_ptr()
                                        and room[1].data_ptr() == layer.values.data_ptr())
    assert checked["left"] and checked["joined"], checked
    for row, ids, budget in zip(rows, prompts, budgets):
        assert row.generated == _alone(lively_engine, ids, budget)


def test_a_run_records_which_step_or_update_raised_its_memory_peak(lively_engine, monkeypatch, tmp_path):
    """The engine watches each decode step and weight update (PeakWatch): the one that raised the high-water mark is
    recorded with the rows and cache columns before it and what the engine held, and a run's segment line keeps it."""
    from rosa2_dspy import memory, provenance
    from rosa2_dspy.engine import GenSettings, scheduler

    readings = {"hwm": 100.0, "rising": 2}

    def fake():  # the mark rises over the next `rising` reads only
        if readings["rising"]:
            readings["rising"] -= 1
            readings["hwm"] += 1.0
        return 50.0, readings["hwm"]

    monkeypatch.setattr(memory, "rss_and_peak_mib", fake)
    monkeypatch.setattr(scheduler, "release_free_heap", lambda: 12.5)  # (reads no memory of its own here)
    engine = _continuous(lively_engine)
    prompt = _prompts(engine, 1)[0]
    greedy = GenSettings(max_tokens=6, do_sample=False, temperature=0.0, top_p=None, top_k=None, seed=None)
    with provenance.segment(tmp_path, engine):
        engine.submit(prompt, greedy).result(timeout=60)  # the first step (the prompt's prefill) raises the mark
        step = engine.stats["peak_set_by"]["step"]
        assert step["rows"] == 1 and step["joining"] == 1 and step["joining_tokens"] == len(prompt)
        assert step["columns"] == 0 and step["kv_cache_mib"] > 0 and step["pinned_adapters"] == 0
        assert "update" not in engine.stats["peak_set_by"]
        readings["rising"] = 2
        with engine.updating():
            pass
    update = provenance.read_segments(tmp_path)[-1]["engine"]["peak_set_by"]["update"]
    assert update["peak_rss_mib"] == 104.0 and update["paused_rows"] == 0 and update["kv_cache_mib"] == 0
    assert update["heap_released_before_mib"] == 12.5
