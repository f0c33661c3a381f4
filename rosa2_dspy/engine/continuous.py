"""Continuous batching: a decode loop whose rows join and leave between steps.

``model.generate`` on a left-padded batch runs every row until the longest one ends: on MATH, where
replies range from 150 to 1024 tokens, a 16-row wave produced 13 useful tokens/s where its slots
could have produced 19 (BENCHMARKS.md). :class:`ContinuousDecoder` keeps one running batch instead.
A finished row leaves at once, and a waiting row is prefilled and joins at the next step.

How rows of different lengths share one KV cache. Every row's cache is aligned on the right, as in a
left-padded batch: column ``j`` of the cache is the same step for every row, and each row's
attention mask zeroes its padding columns. A joining row is prefilled on its own (left-padded with
the other joiners), and its cache is padded on the left to the running cache's length, or the running
cache is padded, whichever is shorter; then the two are stacked on the batch dimension. Keys carry
their rotary positions from when they were computed, so padding never moves a position. A leaving
row is dropped with an index select, and columns that are padding for every row are trimmed.

This is transformers' own left-padded decoding (a 2D attention mask, ``position_ids`` from it, one
shared ``cache_position``), with rows swapped in and out between steps. transformers' built-in
continuous batching (``generate_batch``) packs all rows into one sequence with a block mask; on this
CPU its SDPA path ran 3.4x slower than a padded batch on 16 prompts of 800 tokens, and it has no
per-request seeds, stop strings or per-row adapters.

Greedy rows pick the argmax; sampled rows draw from their own seeded generator over the top-k and
top-p candidates (the same draw as :class:`~rosa2_dspy.engine.generation._TopKSampler`), so a seeded row repeats
whichever rows it runs beside.
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

SAMPLE_TOP_K = 64  # candidates a sampled token is drawn from when the request sets no top_k


@dataclass(eq=False)
class Row:
    """One request in the running batch."""

    input_ids: list[int]
    max_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    tag: Any = None  # the caller's handle (a job, a future, an index)
    generated: list[int] = field(default_factory=list)
    finish: str | None = None  # "stop" | "length", once done
    text: str | None = None  # set for rows that ended on a stop string (cut before it)
    seconds: float = 0.0  # this row's share of the machine time of the steps it was in
    generator: torch.Generator | None = None

    def __post_init__(self):
        if self.temperature > 0 and self.seed is not None:
            self.generator = torch.Generator()
            self.generator.manual_seed(int(self.seed))


def sample_token(logits: torch.Tensor, row: Row) -> int:
    """The next token of ``row`` from its 1D ``logits``: argmax when greedy, else a draw over the
    top-k candidates and their top-p nucleus at the row's temperature, from the row's generator."""
    if row.temperature <= 0:
        return int(torch.argmax(logits))
    values, indices = torch.topk(logits.float(), min(row.top_k or SAMPLE_TOP_K, logits.shape[-1]))
    probs = torch.softmax(values / max(row.temperature, 1e-5), dim=-1)
    if row.top_p is not None and 0 < row.top_p < 1:
        cumulative = probs.cumsum(dim=-1)
        probs = probs.masked_fill(cumulative - probs >= row.top_p, 0.0)
    choice = torch.multinomial(probs.unsqueeze(0), 1, generator=row.generator)
    return int(indices[choice.item()])


CACHE_ROOM = 128  # spare columns each layer of the decoder's KV cache keeps (see roomy_cache)


@functools.cache
def _roomy_layer_class():
    from transformers.cache_utils import DynamicLayer

    class RoomyLayer(DynamicLayer):
        """A ``DynamicLayer`` whose keys and values are views of buffers with ``CACHE_ROOM`` spare columns, so a
        decode step writes its column in place. ``DynamicLayer.update`` concatenates, copying the layer's whole
        cache every step: with 64 rows of 800 tokens that copy was 25% of a decode step (torch profiler, session
        9). When rows join or leave, the decoder hands the layer new tensors (:meth:`replace`): the next update
        moves them into fresh buffers with room."""

        def replace(self, keys: torch.Tensor, values: torch.Tensor) -> None:
            """New keys and values (rows joined or left), and the old buffers let go at once. Kept until the next
            update instead, they held the running cache twice between a step that drops a finished row and the
            next step, which is when a session's weight update runs."""
            self.keys, self.values, self._room = keys, values, None

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n = self.keys.shape[-2] if self.keys.dim() == 4 else 0
            end = n + key_states.shape[-2]
            room = getattr(self, "_room", None)
            # (the decoder replaced keys/values when they no longer start the buffers; _base is unset under
            # inference_mode, the data pointer is not)
            if (room is None or self.keys.data_ptr() != room[0].data_ptr()
                    or self.values.data_ptr() != room[1].data_ptr() or room[0].shape[-2] < end
                    or room[0].shape[0] != key_states.shape[0]):
                shape = (*key_states.shape[:2], end + CACHE_ROOM, key_states.shape[-1])
                room = self._room = key_states.new_empty(shape), value_states.new_empty(shape)
                if n:
                    room[0][:, :, :n] = self.keys
                    room[1][:, :, :n] = self.values
            room[0][:, :, n:end] = key_states
            room[1][:, :, n:end] = value_states
            self.keys, self.values = room[0][:, :, :end], room[1][:, :, :end]
            return self.keys, self.values

    return RoomyLayer


def roomy_cache():
    """A ``DynamicCache`` whose layers append in place (``RoomyLayer``); transformers is imported on first use."""
    from transformers import DynamicCache

    cache = DynamicCache()
    cache.layer_class_to_replicate = _roomy_layer_class()
    return cache


def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    if width <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = width
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


class ContinuousDecoder:
    """Runs rows through a causal LM, one decode step at a time, rows joining and leaving between steps.

    ``step(joining)`` prefills the joining rows, decodes one token for every running row, and returns
    the rows that finished. ``forward_context(rows)``, if given, wraps every forward (the engine puts
    each row's own LoRA weights around it); ``eos_ids`` end a row without being part of its text."""

    def __init__(self, model, tokenizer, eos_ids: list[int], pad_id: int, max_rows: int = 32,
                 forward_context: Callable[[list[Row]], Any] | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.eos_ids, self.pad_id, self.max_rows = set(eos_ids), pad_id, max_rows
        self.forward_context = forward_context or (lambda rows: contextlib.nullcontext())
        self.device = next(model.parameters()).device
        self.rows: list[Row] = []
        self.cache = None  # a DynamicCache, right-aligned across rows
        self.mask: torch.Tensor | None = None  # [rows, columns], 1 where a column is a real token of the row
        self.next_ids: torch.Tensor | None = None  # [rows]: the token each row feeds next
        self.positions: torch.Tensor | None = None  # [rows]: that token's position

    @property
    def free(self) -> int:
        return self.max_rows - len(self.rows)

    def cache_bytes(self) -> int:
        """The memory the running rows' KV cache holds: each layer's buffers, spare columns included."""
        if self.cache is None:
            return 0
        total = 0
        for layer in self.cache.layers:
            room = getattr(layer, "_room", None)
            held = room if room is not None else (layer.keys, layer.values)
            total += sum(t.nbytes for t in held if torch.is_tensor(t))
        return total

    # -- one step -------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self, joining: list[Row] = ()) -> list[Row]:
        """Decode one token for every running row, then prefill ``joining`` (at most ``free``) for its first
        token; return the rows that finished."""
        joining = list(joining)
        if len(joining) > self.free:
            raise ValueError(f"{len(joining)} rows cannot join: {self.free} of {self.max_rows} slots are free")
        started = time.perf_counter()
        finished: list[Row] = []
        if self.rows:  # the running rows' next token
            finished += self._advance(list(self.rows), self._decode(), offset=0)
        if joining:  # the joiners' first token, from their prompts
            logits = self._prefill(joining)
            finished += self._advance(joining, logits, offset=len(self.rows) - len(joining))
        share = (time.perf_counter() - started) / max(len(self.rows), 1)
        for row in self.rows:
            row.seconds += share
        self.drop(finished)
        return finished

    def _forward(self, rows: list[Row], input_ids, attention_mask, position_ids, cache, cache_position):
        was_training = self.model.training
        if was_training:  # (each train()/eval() walks every module: 2% of a decode step)
            self.model.eval()
        try:
            with self.forward_context(rows):
                out = self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                                 position_ids=position_ids.to(self.device), past_key_values=cache,
                                 cache_position=cache_position.to(self.device), use_cache=True, logits_to_keep=1)
        finally:
            if was_training:
                self.model.train()
        return out.logits[:, -1, :].float().cpu()

    def _prefill(self, joining: list[Row]) -> torch.Tensor:
        width = max(len(r.input_ids) for r in joining)
        ids = torch.full((len(joining), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(joining), width), dtype=torch.long)
        for i, row in enumerate(joining):
            ids[i, width - len(row.input_ids):] = torch.tensor(row.input_ids)
            mask[i, width - len(row.input_ids):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = roomy_cache()
        logits = self._forward(joining, ids, mask, positions, cache, torch.arange(width))
        self._merge(joining, cache, mask, positions[:, -1] + 1)
        return logits

    def _merge(self, joining: list[Row], cache, mask: torch.Tensor, positions: torch.Tensor) -> None:
        """Stack the joiners' cache under the running one, both right-aligned to the longer."""
        if self.cache is None or not self.rows:
            self.rows, self.cache, self.mask, self.positions = list(joining), cache, mask, positions
            self.next_ids = torch.zeros(len(joining), dtype=torch.long)
            return
        old, new = self.mask.shape[1], mask.shape[1]
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.replace(torch.cat([_pad_left(mine.keys, new - old, 2), _pad_left(theirs.keys, old - new, 2)]),
                         torch.cat([_pad_left(mine.values, new - old, 2), _pad_left(theirs.values, old - new, 2)]))
        self.mask = torch.cat([_pad_left(self.mask, new - old, 1), _pad_left(mask, old - new, 1)])
        self.positions = torch.cat([self.positions, positions])
        self.next_ids = torch.cat([self.next_ids, torch.zeros(len(joining), dtype=torch.long)])
        self.rows += joining

    def _decode(self) -> torch.Tensor:
        columns = self.mask.shape[1]
        self.mask = torch.cat([self.mask, torch.ones((len(self.rows), 1), dtype=torch.long)], dim=1)
        logits = self._forward(self.rows, self.next_ids[:, None], self.mask, self.positions[:, None], self.cache,
                               torch.tensor([columns]))
        self.positions = self.positions + 1
        return logits

    def _advance(self, rows: list[Row], logits: torch.Tensor, offset: int) -> list[Row]:
        """Give each row its next token (from ``logits``, one line per row); return those that ended."""
        done = []
        for i, row in enumerate(rows):
            token = sample_token(logits[i], row)
            self.next_ids[offset + i] = token
            if token in self.eos_ids:
                row.finish = "stop"
            else:
                row.generated.append(token)
                if row.stop and self._hit_stop(row):
                    row.finish = "stop"
                elif len(row.generated) >= row.max_tokens:
                    row.finish = "length"
            if row.finish:
                done.append(row)
        return done

    def _hit_stop(self, row: Row) -> bool:
        tail = self.tokenizer.decode(row.generated[-32:], skip_special_tokens=True)
        if not any(s in tail for s in row.stop):
            return False
        text = self.tokenizer.decode(row.generated, skip_special_tokens=True)
        cuts = [text.find(s) for s in row.stop if s in text]
        row.text = text[:min(cuts)] if cuts else text
        return True

    def drop(self, leaving: list[Row]) -> None:
        """Take rows out of the running batch: finished ones (``step`` does it), or rows whose callers gave up."""
        if not leaving:
            return
        gone = set(map(id, leaving))
        keep = [i for i, row in enumerate(self.rows) if id(row) not in gone]
        if not keep:
            self.rows, self.cache, self.mask, self.next_ids, self.positions = [], None, None, None, None
            return
        index = torch.tensor(keep)
        self.rows = [self.rows[i] for i in keep]
        self.mask, self.next_ids, self.positions = self.mask[index], self.next_ids[index], self.positions[index]
        # columns that are padding for every remaining row go too
        first = int(self.mask.any(dim=0).nonzero()[0])
        self.mask = self.mask[:, first:]
        device_index = index.to(self.device)
        for layer in self.cache.layers:
            layer.replace(layer.keys.index_select(0, device_index)[:, :, first:],
                          layer.values.index_select(0, device_index)[:, :, first:])

    # -- a whole run ----------------------------------------------------------------------

    def run(self, rows: list[Row]) -> list[Row]:
        """Decode ``rows`` to the end, refilling free slots in order; returns them in the order given."""
        waiting = list(rows)
        while waiting or self.rows:
            joining, waiting = waiting[: self.free], waiting[self.free:]
            self.step(joining)
        return rows

    def text_of(self, row: Row) -> str:
        return row.text if row.text is not None else self.tokenizer.decode(row.generated, skip_special_tokens=True)
