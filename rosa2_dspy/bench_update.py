"""``rosa2 bench update``: seconds per LoRA update through TRL (``LoRAUpdater``) against a minimal raw PyTorch
LoRA loop, same rows, steps and batch size, interleaved; construction overhead, the shift produced, peak RSS;
and ``update_over_generation``, an update against one row's share of a batched answer."""

from __future__ import annotations

import time

import torch

from rosa2_dspy.bench import prefill_and_step
from rosa2_dspy.models import cpu_description
from rosa2_dspy.memory import peak_rss_mib, peak_rss_since_reset_mib, reset_peak_rss

def _repeated(text: str, tokens: int, tokenizer) -> str:
    """``text`` repeated and cut to ``tokens`` tokens of ``tokenizer``."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.decode((ids * (tokens // max(len(ids), 1) + 1))[:tokens])


def _update_rows(limit: int = 8, completion_tokens: int | None = None, tokenizer=None,
                 prompt_tokens: int | None = None) -> list[dict]:
    """SFT rows from MATH train problems: the program's prompt, a reference solution as the target.
    ``completion_tokens``: each target repeated and cut to that many tokens (``tokenizer``'s), the length of a
    long reply (a comparison's rejected replies run to the 1,024-token budget); default: as written.
    ``prompt_tokens``: the problem repeated until the chat prompt is about that long (a conversation's later
    turns carry the history and the clarified statement: ~470 tokens in the main run); default: as written."""
    from rosa2_dspy.adapters import FORMAT_REMINDER
    from rosa2_dspy.math.data import load_examples
    from rosa2_dspy.signatures import Answer
    from rosa2_dspy.weights import sft_row

    rows = []
    for example in load_examples("train", levels="1", limit=limit, seed=0):
        problem = example.problem

        def chat(text: str) -> list[dict]:
            return [{"role": "system", "content": Answer.instructions},
                    {"role": "user", "content": f"{text}\n\n{FORMAT_REMINDER}"}]

        prompt = chat(problem)
        if prompt_tokens:
            body = len(tokenizer.encode(problem, add_special_tokens=False))
            for _ in range(3):  # (tokens merge where the pieces meet: correct the body's length twice)
                prompt = chat(_repeated(problem + "\n\n", body, tokenizer))
                length = len(tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True,
                                                           return_dict=True)["input_ids"])
                body = max(1, body + prompt_tokens - length)
            prompt = chat(_repeated(problem + "\n\n", body, tokenizer))
        completion = example.solution
        if completion_tokens:
            completion = _repeated(completion, completion_tokens, tokenizer)
        rows.append(sft_row(prompt, completion))
    return rows


def raw_lora_update(engine, rows: list[dict], *, steps: int, batch_size: int, learning_rate: float,
                    max_length: int = 1024) -> float:
    """The minimal PyTorch LoRA SFT loop the TRL path is measured against; returns seconds."""
    tokenizer = engine.tokenizer
    encoded = []
    for row in rows:
        prompt = engine.encode_chat(row["prompt"])
        completion = tokenizer.encode(row["completion"], add_special_tokens=False) + [tokenizer.eos_token_id]
        ids = (prompt + completion)[:max_length]
        labels = ([-100] * len(prompt) + completion)[:max_length]
        encoded.append((ids, labels))
    model = engine.peft_model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    started = time.perf_counter()
    model.train()
    for step in range(steps):
        batch = [encoded[(step * batch_size + i) % len(encoded)] for i in range(batch_size)]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((batch_size, width), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((batch_size, width), -100, dtype=torch.long)
        mask = torch.zeros((batch_size, width), dtype=torch.long)
        for i, (ids, lab) in enumerate(batch):  # right padding, as TRL's collator does for training
            input_ids[i, :len(ids)] = torch.tensor(ids)
            labels[i, :len(lab)] = torch.tensor(lab)
            mask[i, :len(ids)] = 1
        loss = model(input_ids=input_ids.to(engine.device), attention_mask=mask.to(engine.device),
                     labels=labels.to(engine.device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return time.perf_counter() - started


def answer_share_seconds(engine, prompts: list[list[int]], *, batch: int, tokens: int, steps: int = 16) -> dict:
    """Machine time one row's answer of ``tokens`` tokens costs in a batch of ``batch`` rows (the batch's
    time shared among its rows, as `bench compare` counts a turn): its prefill plus ``tokens - 1`` decode
    steps, the step time measured over ``steps`` greedy steps. Later steps attend to a longer context;
    for a 1.5B model at 1024 tokens that adds little to steps dominated by the weight matmuls."""
    rows = [prompts[i % len(prompts)] for i in range(batch)]
    prefill, step, _ = prefill_and_step(engine, rows, steps)
    return {"batch": batch, "tokens": tokens, "prefill_seconds": round(prefill, 3), "step_ms": round(1000 * step, 1),
            "seconds_per_row": round((prefill + (tokens - 1) * step) / batch, 3)}


def bench_update(spec: str = "default", *, objective: str = "sft", steps: int = 4, batch_size: int = 4,
                 updates: int = 3, learning_rate: float = 1e-4, rows: int = 8, answer_batch: int = 16,
                 answer_tokens: int = 1024, layers: int | None = None, adapter_dtype: str = "float32",
                 activation_checkpointing: bool = False, completion_tokens: int | None = None,
                 prepack: bool | None = None, frozen_prompt: bool = False, reply_tail: int | None = None,
                 prompt_tokens: int | None = None) -> dict:
    """Wall time per LoRA update through TRL against the raw loop, same rows and steps, interleaved; and
    ``update_over_generation``: the update against one row's share of a batched ``answer_tokens`` answer
    (``answer_batch`` rows), measured in the same run (0 skips it). ``layers``, ``adapter_dtype``,
    ``activation_checkpointing``, ``frozen_prompt`` and ``reply_tail``: :class:`~rosa2_dspy.weights.UpdateConfig`'s;
    ``completion_tokens`` and ``prompt_tokens``: the rows' replies' and prompts' lengths (:func:`_update_rows`), the
    update's ``max_length`` fitting them.
    ``update_peak_rss_mib``: the peak resident memory while the updates ran (the model loaded before), where Linux
    lets it be reset. ``prepack``: the engine's (None: its default)."""
    from rosa2_dspy.engine import LocalEngine
    from rosa2_dspy.weights import UNPAIRED, LoRAUpdater, UpdateConfig, kto_row

    engine = LocalEngine.from_pretrained(spec, prepack=prepack)
    rows = _update_rows(limit=rows, completion_tokens=completion_tokens, tokenizer=engine.tokenizer,
                        prompt_tokens=prompt_tokens)
    # (a prompt of the program is under 512 tokens, unless made longer)
    max_length = max(1024, (completion_tokens or 0) + max(512, (prompt_tokens or 0) + 64))
    if objective in UNPAIRED:  # desirable: the reference solution; undesirable (odd rows): another problem's
        n = len(rows)          # solution, a wrong reply of realistic length
        rows = [kto_row(r["prompt"], r["completion"] if i % 2 == 0 else rows[(i + 1) % n]["completion"], i % 2 == 0)
                for i, r in enumerate(rows)]
    config = UpdateConfig(objective=objective, steps=steps, batch_size=batch_size, learning_rate=learning_rate,
                          layers=layers, adapter_dtype=adapter_dtype, activation_checkpointing=activation_checkpointing,
                          max_length=max_length, frozen_prompt=frozen_prompt, reply_tail=reply_tail)
    updater = LoRAUpdater(engine, config)
    update_peak = reset_peak_rss()
    start_state = engine.snapshot()
    trl_seconds, raw_seconds, prepare, shifts = [], [], [], []
    first_update = None
    for index in range(updates):
        engine.restore(start_state)
        result = updater.update(rows)
        shifts.append(result.update_shift)
        if index == 0:
            first_update = result
        else:
            trl_seconds.append(result.seconds - result.prepare_seconds)
            prepare.append(result.prepare_seconds)
        engine.restore(start_state)
        if objective == "sft" and not frozen_prompt:  # (the raw loop trains on whole rows; sft takes no tail)
            raw_seconds.append(raw_lora_update(engine, rows, steps=steps, batch_size=batch_size,
                                               learning_rate=learning_rate, max_length=max_length))
    engine.restore(start_state)
    update_peak = peak_rss_since_reset_mib() if update_peak else None
    prompt_tokens = [len(engine.encode_chat(r["prompt"])) for r in rows]
    out = {
        "model": engine.name, "device": str(engine.device), "cpu": cpu_description(), "dtype": str(engine.model.dtype).replace("torch.", ""),
        "objective": objective, "rows": len(rows), "steps": steps, "batch_size": batch_size,
        "completion_tokens": completion_tokens or "as written",
        "prompt_tokens_per_row": round(sum(prompt_tokens) / len(prompt_tokens), 1),
        "adapted_blocks": layers or "all", "adapter_dtype": str(next(p for n, p in engine.model.named_parameters()
                                                                     if "lora_" in n).dtype).replace("torch.", ""),
        "activation_checkpointing": activation_checkpointing, "frozen_prompt": frozen_prompt, "reply_tail": reply_tail,
        "prepacked": engine.prepacked,
        "trainer_batch_size": updater._batch_size(objective, len(rows)), "updates": updates,
        "first_update_seconds": round(first_update.seconds, 3),
        "construction_seconds_first_update": round(first_update.prepare_seconds, 3),
        "prepare_seconds_per_update": round(sum(prepare) / len(prepare), 3),
        "trl_train_seconds_per_update": round(sum(trl_seconds) / len(trl_seconds), 3),
        "trl_total_seconds_per_update": round((sum(trl_seconds) + sum(prepare)) / len(trl_seconds), 3),
        "l2_shift_per_update": round(sum(shifts) / len(shifts), 6),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "update_peak_rss_mib": round(update_peak, 1) if update_peak is not None else None,
    }
    if raw_seconds:
        raw = sum(raw_seconds[1:] or raw_seconds) / len(raw_seconds[1:] or raw_seconds)
        out["raw_seconds_per_update"] = round(raw, 3)
        out["trl_over_raw"] = round(out["trl_total_seconds_per_update"] / raw, 3)
        out["target_trl_over_raw"] = 1.25
        out["target_met"] = out["trl_over_raw"] <= 1.25
    if answer_batch:
        prompts = [engine.encode_chat(r["prompt"]) for r in rows]
        answer = answer_share_seconds(engine, prompts, batch=answer_batch, tokens=answer_tokens)
        out["answer_generation"] = answer
        out["update_over_generation"] = round(out["trl_total_seconds_per_update"] / answer["seconds_per_row"], 3)
        out["target_update_over_generation"] = 1.0
    return out
