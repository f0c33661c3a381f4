"""Batched generation: one left-padded ``model.generate`` over rows that share settings, in the caller's thread.

Also the pieces it is built from (the top-k sampler, per-row stop strings, left padding) and the
memory helpers that keep a long-running engine lean.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from rosa2_dspy.engine.continuous import SAMPLE_TOP_K
from rosa2_dspy.engine.settings import Completion, GenSettings
from rosa2_dspy.faults import failpoint


class _TopKSampler:
    """Draws the next token from softmax(logits / T) restricted to the top-k tokens and the top-p nucleus
    among them, and returns scores where only that token is finite, so greedy search emits it.

    Equivalent to transformers' top-k -> top-p -> multinomial chain, at a fraction of the cost: it
    never sorts the full vocabulary. Each row with a seed draws from its own generator, so a seeded
    request repeats whatever batch it lands in; rows without one share torch's global generator."""

    def __init__(self, temperature: float, top_p: float | None, top_k: int, seeds: list[int | None]):
        self.temperature = max(float(temperature), 1e-5)
        self.top_p = top_p if top_p is not None and 0 < top_p < 1 else None
        self.top_k = int(top_k)
        self.generators: list[torch.Generator | None] = []
        for seed in seeds:
            generator = None
            if seed is not None:
                generator = torch.Generator()
                generator.manual_seed(int(seed))
            self.generators.append(generator)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        values, indices = torch.topk(scores.float(), min(self.top_k, scores.shape[-1]), dim=-1)
        probs = torch.softmax(values / self.temperature, dim=-1)
        if self.top_p is not None:  # keep the smallest prefix whose mass reaches top_p (the first always)
            cumulative = probs.cumsum(dim=-1)
            probs = probs.masked_fill(cumulative - probs >= self.top_p, 0.0)
        probs = probs.cpu()
        if all(g is None for g in self.generators):
            choice = torch.multinomial(probs, 1)
        else:
            choice = torch.cat([torch.multinomial(probs[row:row + 1], 1, generator=self.generators[row])
                                for row in range(probs.shape[0])])
        choice = choice.to(indices.device)
        chosen = indices.gather(-1, choice)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(-1, chosen, 0.0)


class _StopOnStrings:
    """Per-row stopping on stop strings: each row of a batch has its own stop list."""

    def __init__(self, tokenizer, stops: list[tuple[str, ...]], prompt_len: int):
        self.tokenizer, self.stops, self.prompt_len = tokenizer, stops, prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for row, stop in enumerate(self.stops):
            if stop:
                tail = self.tokenizer.decode(input_ids[row, self.prompt_len:][-32:], skip_special_tokens=True)
                done[row] = any(s in tail for s in stop)
        return done


class GenerationMixin:
    """Batched ``generate`` for :class:`~rosa2_dspy.engine.LocalEngine`."""

    # ------------------------------------------------------------------ generation

    def encode_chat(self, messages: list[dict]) -> list[int]:
        encoded = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                     return_dict=True)
        return list(encoded["input_ids"])

    def generate_batch(self, prompts: list[list[int]], settings: GenSettings,
                       stops: list[tuple[str, ...]] | None = None, seeds: list[int | None] | None = None,
                       row_weights: list[str] | None = None) -> list[Completion]:
        """Run prompts (token ids) as one left-padded batch under the same settings, now, in this thread.

        ``seeds`` gives each sampled row its own seed (default: ``settings.seed`` for every row);
        ``row_weights`` gives each row its own weights id (from :meth:`_weights_for`), a mixed-weights
        batch (see :meth:`pin`)."""
        stops = stops or [()] * len(prompts)
        seeds = seeds if seeds is not None else [settings.seed] * len(prompts)
        pad = self.tokenizer.pad_token_id
        ids, mask = left_pad(prompts, pad)
        width = ids.shape[1]
        kwargs: dict[str, Any] = dict(max_new_tokens=settings.max_tokens, do_sample=settings.do_sample,
                                      pad_token_id=pad, eos_token_id=self.eos_token_ids)
        # only the last position's logits: a PEFT-wrapped model hides the forward's logits_to_keep from generate,
        # which then projects every prompt position onto the 152k vocabulary (17 s and GBs per 5-row prefill)
        kwargs.update(temperature=None, top_p=None, top_k=None, logits_to_keep=1)
        if settings.do_sample:
            # sampled inside a logits processor over the top-k candidates, then picked "greedily"
            # (transformers' own sampler sorts the whole 49k vocabulary every step: ~13 ms a row here)
            from transformers import LogitsProcessorList

            kwargs["logits_processor"] = LogitsProcessorList([_TopKSampler(
                settings.temperature, settings.top_p, settings.top_k or SAMPLE_TOP_K, seeds)])
        if any(stops):
            from transformers import StoppingCriteriaList

            kwargs["stopping_criteria"] = StoppingCriteriaList([_StopOnStrings(self.tokenizer, stops, width)])
        per_row = self._per_row_adapters(row_weights) if row_weights is not None else self._uniform_context()
        with self._waiting():  # (a stalled failpoint is a generation that never ends, not torch at work)
            failpoint("generate.batch")
        with self.weights_lock, torch.inference_mode(), per_row:
            was_training = self.model.training
            self.model.eval()
            started = time.perf_counter()
            try:
                out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                          **kwargs)
            finally:
                self.model.train(was_training)
            share = (time.perf_counter() - started) / len(prompts)
        results = []
        for row, prompt in enumerate(prompts):
            new = out[row, width:].tolist()
            finish = "length"
            for i, tok in enumerate(new):
                if tok in self.eos_token_ids:
                    new, finish = new[:i], "stop"
                    break
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            for s in stops[row]:
                cut = text.find(s)
                if cut >= 0:
                    text, finish = text[:cut], "stop"
            results.append(Completion(text, len(prompt), len(new), finish, share))
        return results

    def _eos_ids(self) -> list[int]:
        ids = set()
        for tid in (self.tokenizer.eos_token_id, getattr(self.model.generation_config, "eos_token_id", None)):
            if isinstance(tid, int):
                ids.add(tid)
            elif isinstance(tid, (list, tuple)):
                ids.update(tid)
        im_end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int) and im_end != self.tokenizer.unk_token_id:
            ids.add(im_end)
        return sorted(ids)


def _dense_strides(shape) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def _contiguous_input(module, args):
    """The output head gets its input with a row-major layout. generate and the continuous decoder hand it the
    last position's hidden states, a strided slice; once PEFT has frozen the head's weight, ``matmul`` no
    longer folds that 3D slice into one matrix product but runs a batched one over a copy of the 152k x 1536
    weight per row: a 5-row prefill of the 1.5B model took 19.6 s instead of 2.3 s (BENCHMARKS.md).
    ``.contiguous()`` fixed many rows but not one: a [1, 1, H] slice counts as contiguous (strides of size-1
    dimensions are ignored) while matmul's folding test reads them, and a one-row prefill (a row joining the
    running batch) paid 3.4 s for its last position's logits (session 9); hence a copy whenever the strides
    are not the dense ones (a few kB)."""
    x = args[0]
    if x.stride() != _dense_strides(x.shape):
        x = x.clone(memory_format=torch.contiguous_format)
    return (x, *args[1:])


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists to a left-padded id tensor and its attention mask (decoder-only batching)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    return ids, mask
