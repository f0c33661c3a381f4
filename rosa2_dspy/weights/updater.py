"""The updater: :class:`LoRAUpdater` trains the engine's adapter in place through TRL, within a trust region."""

from __future__ import annotations

import contextlib
import contextvars
import math
import sys
import tempfile
import time
from typing import Any

import torch

from rosa2_dspy import models
from rosa2_dspy.engine import LocalEngine
from rosa2_dspy.faults import failpoint
from rosa2_dspy.progress import progress_line
from rosa2_dspy.weights.config import OBJECTIVES, UNPAIRED, Shift, UpdateConfig, UpdateError, UpdateResult
from rosa2_dspy.weights.rows import _to_trl
from rosa2_dspy.weights.shift import adapter_shift



class _LossGuard:
    """A TrainerCallback that stops training at the first non-finite loss or gradient norm; and, with ``progress``
    (a compile's LoRA training, minutes long), writes a progress line to stderr at most every ``every`` seconds and
    at the last step of an update of several optimizer steps: steps done, loss, elapsed, ETA. A session's updates
    stay quiet: their conversations' progress is the run's."""

    def __init__(self, progress: bool = False, every: float = 60.0):
        from transformers import TrainerCallback

        guard = self

        class _Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                guard.started = guard.last_line = time.perf_counter()

            def on_log(self, args, state, control, logs=None, **kwargs):
                for key in ("loss", "grad_norm"):
                    value = (logs or {}).get(key)
                    if value is not None and not math.isfinite(float(value)):
                        guard.bad = f"non-finite {key} ({value}) at step {state.global_step}"
                        control.should_training_stop = True
                now, loss = time.perf_counter(), (logs or {}).get("loss")
                if guard.progress and state.max_steps > 1 and loss is not None and (
                        now - guard.last_line >= guard.every or state.global_step >= state.max_steps):
                    guard.last_line = now
                    line = progress_line("weights: optimizer steps", state.global_step, state.max_steps, None,
                                         now - guard.started)
                    print(f"{line} (loss {float(loss):.4g})", file=sys.stderr, flush=True)
                return control

        self.bad, self.progress, self.every = "", progress, every
        self.started = self.last_line = time.perf_counter()
        self.callback = _Callback()


@contextlib.contextmanager
def _light_datasets():
    """``datasets`` for the few in-memory rows of one update: no progress bars, and no fingerprint hashing.

    Every ``Dataset.map`` names its result by hashing (pickling) its function and arguments; TRL's
    tokenize step passes the tokenizer, and pickling Qwen2.5's 151k-entry tokenizer took 3.1 s of each
    ~25 s update (py-spy, session 9). A fingerprint names cache files, and an in-memory dataset writes
    none, so a random one serves. Both names ``datasets`` calls it by are swapped back afterwards."""
    import datasets
    from datasets import arrow_dataset, fingerprint

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    hashing = fingerprint.update_fingerprint, arrow_dataset.update_fingerprint

    def random_fingerprint(*args, **kwargs):
        return fingerprint.generate_random_fingerprint()

    fingerprint.update_fingerprint = arrow_dataset.update_fingerprint = random_fingerprint
    try:
        yield
    finally:
        fingerprint.update_fingerprint, arrow_dataset.update_fingerprint = hashing
        if was_enabled:
            datasets.enable_progress_bars()


@contextlib.contextmanager
def _score_completions_only():
    """TRL's fused LM head scoring only the positions that carry a label, on CPU too.

    ``trl.trainer.utils.add_fused_lm_head`` projects through the LM head only the labelled (reply) positions on
    Triton devices; elsewhere it scores every position, prompt included, so that compilers (Neuron) see fixed
    tile shapes. On CPU nothing is compiled, and the head of Qwen2.5-1.5B (151,936 x 1,536) over a whole row of an
    update cost 29.5% of it in forward and backward, the backward in float32 (py-spy of the tuning run,
    session 10); the prompt is about half a row. TRL decides with the name ``_use_triton`` in that module, read
    only there (the chunked kernel keeps its own, and still folds the tiles in torch on CPU); it answers yes for
    CPU tensors while an update runs. A TRL whose fused head no longer reads that name is left as it is."""
    from trl.trainer import utils as trl_utils

    original = getattr(trl_utils, "_use_triton", None)
    if original is None:
        yield
        return
    trl_utils._use_triton = lambda device: device.type == "cpu" or original(device)
    try:
        yield
    finally:
        trl_utils._use_triton = original


@contextlib.contextmanager
def _forward_wrapped(model, wrap):
    """``model.forward`` replaced by ``wrap(original)`` while the block runs, then put back. The wrappers below
    (each an update setting) nest, each seeing what the one outside it passes on."""
    original = model.forward
    model.forward = wrap(original)
    try:
        yield
    finally:
        model.forward = original


def _reference_from_policy(model):
    """An update that starts from the base weights (a conversation's first): the reference forward of its
    first step answered by the policy forward just before it, detached, since the policy then is the reference.

    TRL's ``KTOTrainer`` (1.16) runs the policy forward, then the reference forward on the same tensors under
    ``no_grad`` with the adapter switched off. With the adapter at zero the two give the same log-probabilities,
    so the second forward (a quarter of an update's work) is dropped. Only the first no-grad call after a
    policy call on the very same tensors is answered so; once one is, later ones (after an optimizer step the
    policy has moved) run as usual. A trainer that calls in another order simply runs both."""
    def wrap(original):
        last = {}

        def forward(*args, **kwargs):
            if torch.is_grad_enabled():
                out = original(*args, **kwargs)
                last["inputs"], last["out"] = (kwargs.get("input_ids"), kwargs.get("labels")), out
                return out
            held, (ids, labels) = last.pop("out", None), last.pop("inputs", (None, None))
            if held is not None and not args and ids is not None and ids is kwargs.get("input_ids") \
                    and labels is kwargs.get("labels"):
                model.forward = original  # one reuse per update
                return type(held)(**{k: v.detach() if torch.is_tensor(v) else v for k, v in held.items()})
            return original(*args, **kwargs)

        return forward

    return _forward_wrapped(model, wrap)


def _last_labelled(labels: torch.Tensor, tokens: int) -> torch.Tensor:
    """``labels`` with every labelled position but each row's last ``tokens`` set to -100 (ignored)."""
    labelled = labels != -100
    from_end = labelled.flip(1).cumsum(1).flip(1)  # labelled positions at or after each column, per row
    return labels.masked_fill(labelled & (from_end > tokens), -100)


def _score_reply_tail(model, tokens: int):
    """An update that scores only the last ``tokens`` of each reply (``UpdateConfig.reply_tail``).

    TRL's preference trainers (KTO, its ``apo_zero_unpaired`` loss, DPO) sum per-token log-probabilities over the
    labelled positions of every forward they run, the policy's and the reference's alike, all through
    ``model(..., labels=..., fused_lm_head=True)``; masking the labels at that call keeps both sums over the same
    tokens. The reply's earlier tokens stay in the row as context. Under ``frozen_prompt`` (inside this wrapper) the
    first labelled column then lies near the reply's end, so the no-gradient prefix takes the reply's head too."""
    def wrap(original):
        def forward(*args, **kwargs):
            labels = kwargs.get("labels")
            if torch.is_tensor(labels) and kwargs.get("fused_lm_head"):
                kwargs["labels"] = _last_labelled(labels, tokens)
            return original(*args, **kwargs)

        return forward

    return _forward_wrapped(model, wrap)


def _read_only_cache(cache, rows: slice | None = None):
    """A prompt's keys and values (a ``DynamicCache`` of full-attention layers; ``rows``: those rows of it only) as a
    cache that a forward reads and never extends, or None for any other cache (sliding windows, quantized or static
    layers: the update then runs the whole row). Reading only is what lets activation checkpointing recompute a
    block against it: the recompute sees the same keys and values as the forward did (transformers'
    ``_can_checkpoint_with_cache``)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    class _ReadOnlyLayer(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)

    if type(cache) is not DynamicCache or not cache.layers or any(type(layer) is not DynamicLayer or
                                                                    not layer.is_initialized for layer in cache.layers):
        return None
    rows = rows or slice(None)
    frozen = DynamicCache()
    for layer in cache.layers:
        read_only = _ReadOnlyLayer()
        read_only.lazy_initialization(layer.keys, layer.values)
        read_only.keys, read_only.values = layer.keys[rows].detach(), layer.values[rows].detach()
        frozen.layers.append(read_only)
    return frozen


def _shared_columns(ids: torch.Tensor, mask: torch.Tensor | None, limit: int) -> int:
    """How many leading columns, up to ``limit``, every row of a batch of two or more holds the same real tokens in
    (the prompt, when an update's rows share one); 0 for one row."""
    if ids.shape[0] < 2 or limit < 1:
        return 0
    same = (ids[:, :limit] == ids[:1, :limit]).all(dim=0)
    if mask is not None:
        same &= (mask[:, :limit] == 1).all(dim=0)
    differ = (~same).nonzero()
    return int(differ[0]) if len(differ) else min(limit, ids.shape[1])


def _prefix_cache(backbone, ids: torch.Tensor, mask: torch.Tensor | None, split: int, share: bool):
    """The keys and values of every row's columns before ``split``, computed without gradients. With ``share``, the
    columns all rows begin with the same tokens in (:func:`_shared_columns`) run once, on one row, and serve every
    row; the rest run batched after them. The same numbers as a batched run of the whole prefix, up to the rounding
    of products over another number of rows."""
    from transformers.cache_utils import DynamicCache

    # (a cache handed in, not use_cache=True, which transformers turns off under activation checkpointing)
    cache = DynamicCache(config=backbone.config)
    shared = _shared_columns(ids, mask, split) if share else 0
    with torch.no_grad():
        if shared:
            backbone(input_ids=ids[:1, :shared], attention_mask=None if mask is None else mask[:1, :shared],
                     past_key_values=cache)
            cache.batch_repeat_interleave(ids.shape[0])
        if split > shared:
            backbone(input_ids=ids[:, shared:split], attention_mask=None if mask is None else mask[:, :split],
                     past_key_values=cache)
    return cache


def _row_end(mask: torch.Tensor | None, row: int, width: int) -> int:
    """One past a right-padded row's last real token."""
    return width if mask is None else int(mask[row].nonzero().max()) + 1


def _suffix(original, kwargs: dict, cache, split: int, end: int, rows: slice | None = None):
    """The columns ``split:end`` of the rows of ``kwargs`` through ``original``, reading ``cache`` (the columns before
    ``split``, of these rows or, with ``rows``, of a batch they are those rows of; None when ``split`` is 0); its
    per-token outputs padded with zeros (TRL's value where the label is -100) to the whole row. None: the prefix's
    cache cannot be read so (another kind of cache)."""
    ids, labels, mask = kwargs["input_ids"], kwargs["labels"], kwargs.get("attention_mask")
    extra = {}
    if split:
        extra["past_key_values"] = _read_only_cache(cache, rows)
        if extra["past_key_values"] is None:
            return None
    out = original(**{**kwargs, "input_ids": ids[:, split:end], "labels": labels[:, split:end],
                      "attention_mask": None if mask is None else mask[:, :end], **extra})
    width = end - split - 1  # the suffix's next-token positions

    def whole_row(value):
        if not (torch.is_tensor(value) and value.dim() == 2 and value.shape[1] == width):
            return value
        return torch.cat([value.new_zeros(value.shape[0], split), value,
                          value.new_zeros(value.shape[0], ids.shape[1] - end)], dim=1)

    return type(out)(**{key: whole_row(value) for key, value in out.items()})


def _joined(rows: list, kwargs: dict):
    """Row outputs (None: a row that ran nowhere, scored zeros) as one batch's, with the fused head's loss: minus the
    log-probabilities' sum over the labelled tokens (or the count the trainer gives)."""
    template = next(row for row in rows if row is not None)
    joined = {key: torch.cat([template[key].new_zeros(template[key].shape) if row is None else row[key]
                              for row in rows])
              for key, value in template.items() if torch.is_tensor(value) and value.dim() == 2}
    items = kwargs.get("num_items_in_batch")
    joined["loss"] = -joined["log_probs"].sum() / (joined["label_mask"].sum().clamp(min=1) if items is None
                                                   else items)
    return type(template)(**joined)


def _one_row(kwargs: dict, row: int) -> dict:
    """A fused call's keyword arguments for one of its rows."""
    return {**kwargs, **{k: kwargs[k][row:row + 1] for k in ("input_ids", "labels", "attention_mask")
                         if kwargs.get(k) is not None}}


# the gradient tokens of the whole call a row-by-row forward belongs to (:func:`_rows_to_their_ends`), for
# :func:`_checkpoint_large_forwards` to decide on; None outside one
_CALL_GRADIENT_TOKENS: contextvars.ContextVar[int | None] = contextvars.ContextVar("_call_gradient_tokens",
                                                                                   default=None)


def _rows_to_their_ends(original, kwargs: dict, cache, split: int, scored: list[bool]):
    """The columns from ``split`` of every row up to its own last real token, not the batch's longest (its padding
    columns compute nothing TRL reads): one batch where every row ends at the same column, else row by row, each
    reading its rows of ``cache``. A row with nothing scored runs nowhere and scores zeros. None: the cache cannot
    be read so."""
    ids, mask = kwargs["input_ids"], kwargs.get("attention_mask")
    ends = [_row_end(mask, row, ids.shape[1]) for row in range(ids.shape[0])]
    if len(set(ends)) == 1 and all(scored):
        return _suffix(original, kwargs, cache, split, ends[0])
    rows = []
    # the rows' forwards checkpoint as the call's gradient tokens, all rows together, say (a batched call's would)
    whole = _CALL_GRADIENT_TOKENS.set(sum(end - split for end, keep in zip(ends, scored) if keep))
    try:
        for row, (end, keep) in enumerate(zip(ends, scored)):
            if not keep:
                rows.append(None)
                continue
            out = _suffix(original, _one_row(kwargs, row), cache, split, end, slice(row, row + 1))
            if out is None:
                return None
            rows.append(out)
    finally:
        _CALL_GRADIENT_TOKENS.reset(whole)
    return _joined(rows, kwargs)


def _fused_call(args: tuple, kwargs: dict) -> bool:
    """Whether a forward is TRL's ``model(input_ids=..., attention_mask=..., labels=..., fused_lm_head=True)``, with
    no cache and no other tensor: the calls the update's wrappers below know how to split."""
    known = ("input_ids", "attention_mask", "labels")
    unknown = [k for k, v in kwargs.items() if torch.is_tensor(v) and k not in known]
    return not (args or unknown or kwargs.get("input_ids") is None or kwargs.get("labels") is None
                or not kwargs.get("fused_lm_head") or kwargs.get("past_key_values") is not None
                or kwargs.get("output_router_logits"))


@contextlib.contextmanager
def _reference_shares_prefix(model):
    """An update's forwards without gradients (the reference's, from moved weights) with their rows' shared prompt
    run once and each row only up to its own last token (``UpdateConfig.share_prefix``).

    A later update trains on every rejected reply of the conversation under one prompt, so its rows begin with the
    same few hundred tokens, and TRL right-pads a shorter reply to the longest. The shared columns run on one row
    (:func:`_prefix_cache`) and each row from there to its own end (:func:`_rows_to_their_ends`); the per-token
    log-probabilities are the whole rows', in TRL's shapes, up to the rounding of products over other row counts.
    A call with gradients, or one the wrapper does not know, runs as it came."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = base.base_model

    def wrap(original):
        def forward(*args, **kwargs):
            if torch.is_grad_enabled() or not _fused_call(args, kwargs):
                return original(*args, **kwargs)
            ids, labels, mask = kwargs["input_ids"], kwargs["labels"], kwargs.get("attention_mask")
            labelled = labels != -100
            scored = labelled.any(dim=1).tolist()
            if ids.shape[0] < 2 or not any(scored):
                return original(*args, **kwargs)
            # the shared columns, short of every scored row's first predicting position (a prefix has no head)
            first = min(int(labelled[row].int().argmax()) - 1 for row, keep in enumerate(scored) if keep)
            split = _shared_columns(ids, mask, first)
            cache = _prefix_cache(backbone, ids, mask, split, share=True) if split else None
            out = _rows_to_their_ends(original, kwargs, cache, split, scored)
            return original(*args, **kwargs) if out is None else out

        return forward

    # (a no-grad call TRL leaves checkpointing on for: KTO's KL forward of the policy)
    with _blocks_checkpoint_with_a_read_only_cache(model), _forward_wrapped(model, wrap):
        yield


def _checkpointable_blocks(model) -> list:
    """The model's transformer blocks that activation checkpointing wraps (transformers' GradientCheckpointingLayer),
    whose ``gradient_checkpointing`` flag decides at each forward."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


@contextlib.contextmanager
def _blocks_checkpoint_with_a_read_only_cache(model):
    """The model's blocks told that a checkpointed forward may keep the cache it is handed (transformers'
    ``_can_checkpoint_with_cache``), while the block runs: the update's wrappers hand them a prefix they only read
    (:func:`_read_only_cache`), so a recompute sees the same keys and values. A block already told (by a wrapper
    outside this one) is left to it."""
    told = [block for block in _checkpointable_blocks(model) if "_can_checkpoint_with_cache" not in vars(block)]
    for block in told:
        block._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for block in told:
            block.__dict__.pop("_can_checkpoint_with_cache", None)


@contextlib.contextmanager
def _checkpoint_large_forwards(model, min_tokens: int):
    """Activation checkpointing for an update's large forwards only (``UpdateConfig.checkpointing_min_tokens``).

    With checkpointing on (the Trainer turns it on for every block), a forward with gradients over at least
    ``min_tokens`` tokens (its rows times its columns: under a frozen prefix, the columns that take gradients; a
    call that ``share_prefix`` runs row by row counts all its rows' columns, as the batch would)
    checkpoints as configured; a smaller one, and any forward without gradients (the reference's), keeps its
    activations. A large forward is where checkpointing pays: a long reply under one prefix per batch kept 14.3 GB
    of activations without it, 4.5 GB with it (BENCHMARKS.md, session 23); a small one's activations are few, and
    checkpointing it only costs its recompute (1.18x a conversation's first update there). The blocks decide at
    their forward, so the recompute in the backward pass follows the choice made then; the update is the same to
    the bit either way."""
    blocks = _checkpointable_blocks(model)

    def wrap(original):
        def forward(*args, **kwargs):
            configured = [block.gradient_checkpointing for block in blocks]
            if not any(configured):
                return original(*args, **kwargs)
            tokens = kwargs.get("input_ids", args[0] if args else None)
            if tokens is None:
                tokens = kwargs.get("inputs_embeds")
            call = _CALL_GRADIENT_TOKENS.get()  # (a row of a call run row by row: the call's tokens decide)
            large = torch.is_grad_enabled() and (not torch.is_tensor(tokens) or (
                tokens.shape[:2].numel() if call is None else call) >= min_tokens)
            for block, on in zip(blocks, configured):
                block.gradient_checkpointing = on and large
            try:
                return original(*args, **kwargs)
            finally:
                for block, on in zip(blocks, configured):
                    block.gradient_checkpointing = on

        return forward

    with _forward_wrapped(model, wrap):
        yield


@contextlib.contextmanager
def _prompt_as_frozen_prefix(model, per_row: bool = False, share: bool = False):
    """An update whose rows' prompts run once without gradients, as a cached prefix, and whose forward and backward
    (and activation checkpointing's recompute) cover the replies only (``UpdateConfig.frozen_prompt``).

    A rejected reply is typically half of its row (BENCHMARKS.md, session 17: 549 reply and 469 prompt tokens
    per ``ttt`` update), and an update is compute-bound: a token with gradients costs 8 FLOP a parameter
    (forward, recompute, backward), one in a no-grad prefix 2. The loss is the same; the gradient is not: it
    keeps what flows through the replies' own positions and drops what flows back into the prompt's keys and
    values, so it is a different update, chosen on train problems, not a free speed-up.

    It works at TRL's call ``model(input_ids=..., attention_mask=..., labels=..., fused_lm_head=True)`` (every
    trainer's policy forward with its fused LM head): a row's columns before its first labelled one, less one (whose
    hidden state predicts the first reply token), are its prefix: its prompt (TRL right-pads prompt and reply
    together), and under ``reply_tail`` the reply's head too. The rows run as one batch, split at the earliest
    such column, so a row whose scored part starts later (a longer reply under a tail, a longer prompt) takes
    gradients from there; with ``per_row`` (``UpdateConfig.prefix_per_row``) rows whose splits differ run each on
    its own, up to its last real token, so that a row's gradient never depends on the other rows of its batch.
    With ``share`` (``UpdateConfig.share_prefix``) the batch's split stays where it is, and so does the gradient,
    but the columns every row begins with run once, on one row, and each row's suffix ends at its own last token
    rather than the longest row's (:func:`_rows_to_their_ends`): the same update up to rounding, for less work.
    The per-token outputs are padded back to the whole row with zeros, TRL's value where the label is -100, so TRL
    sees the shapes it asked for. Any other call (no gradients: the reference forward; inputs it does not know)
    runs the whole row."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    blocks = _checkpointable_blocks(model)
    # an older transformers strips any cache from a checkpointed block: the prefix would silently go unread
    can_checkpoint = hasattr(GradientCheckpointingLayer, "_can_checkpoint_with_cache")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = base.base_model

    def wrap(original):
        def forward(*args, **kwargs):
            if not _fused_call(args, kwargs) or not torch.is_grad_enabled() \
                    or (not can_checkpoint and any(b.gradient_checkpointing and b.training for b in blocks)):
                return original(*args, **kwargs)
            ids, labels, mask = kwargs["input_ids"], kwargs["labels"], kwargs.get("attention_mask")
            labelled = labels != -100
            scored = labelled.any(dim=1).tolist()
            splits = (labelled.int().argmax(dim=1) - 1).tolist()
            if not any(scored):
                return original(*args, **kwargs)
            if not per_row or (all(scored) and len(set(splits)) == 1):
                # one prefix for every row, up to the earliest column any row scores
                split = min(split for split, keep in zip(splits, scored) if keep)
                if split < 1:
                    return original(*args, **kwargs)
                cache = _prefix_cache(backbone, ids, mask, split, share)
                out = _rows_to_their_ends(original, kwargs, cache, split, scored) if share \
                    else _suffix(original, kwargs, cache, split, ids.shape[1])
                return original(*args, **kwargs) if out is None else out
            # rows whose scored part starts at different columns (replies of different lengths under reply_tail,
            # prompts of different lengths under TRL's right padding): each row on its own, its prefix its own and
            # its suffix ending at its last real token, so that no row takes gradients through another's prefix
            # width; a row with nothing scored (its reply cut by max_length) runs nowhere and scores zeros
            rows = []
            for i, (split, keep) in enumerate(zip(splits, scored)):
                if not keep:
                    rows.append(None)
                    continue
                one = _one_row(kwargs, i)
                end = _row_end(mask, i, ids.shape[1])
                out = None
                if split >= 1:
                    out = _suffix(original, one, _prefix_cache(backbone, one["input_ids"], one.get("attention_mask"),
                                                               split, False), split, end)
                rows.append(original(**one) if out is None else out)
            return _joined(rows, kwargs)

        return forward

    with _blocks_checkpoint_with_a_read_only_cache(model), _forward_wrapped(model, wrap):
        yield


def _checkpointing(on: bool) -> dict:
    """TrainingArguments for activation checkpointing of every block, or none. Non-reentrant: the frozen base needs
    no input gradients. The deprecated alias is set too, as TRL's configs default it to on."""
    on = bool(on)
    kwargs = {"use_reentrant": False} if on else None
    return {"activation_checkpointing": on, "activation_checkpointing_kwargs": kwargs,
            "gradient_checkpointing": on, "gradient_checkpointing_kwargs": kwargs}


class LoRAUpdater:
    """Small LoRA updates of a running engine's adapter, in place, through TRL.

    ``update(rows)`` takes rows built with :func:`sft_row`, :func:`kto_row` or :func:`dpo_row`
    (chat messages plus a label) and returns an :class:`UpdateResult`. The engine's
    ``weights_lock`` is held for the whole update, so no generation sees half-updated weights.
    """

    def __init__(self, engine: LocalEngine, config: UpdateConfig | None = None, progress: bool = False):
        """``progress``: write a line a minute to stderr during an update of several optimizer steps (for
        compile-time training; a session's updates leave progress to the run)."""
        self.engine = engine
        self.config = config or UpdateConfig()
        try:
            engine.attach_adapter(self.config.lora_config(engine.model), seed=self.config.seed,
                                  adapter_dtype=self.config.adapter_dtype)
        except ValueError as exc:
            raise UpdateError(str(exc)) from None
        self._trainers: dict[str, Any] = {}
        self._guard = _LossGuard(progress)
        self._output_dir = tempfile.mkdtemp(prefix="rosa2-trainer-")  # TRL wants one; nothing is saved there
        self.session_start = engine.snapshot()
        self.history: list[UpdateResult] = []
        self._kto_weights = {"desirable_weight": self.config.desirable_weight,
                             "undesirable_weight": self.config.undesirable_weight}

    def _balance(self, trl_rows: list[dict]) -> None:
        """KTO's loss weights for this update: as configured, or balanced so that
        desirable_weight * n_desirable == undesirable_weight * n_undesirable."""
        cfg = self.config
        weights = {"desirable_weight": cfg.desirable_weight, "undesirable_weight": cfg.undesirable_weight}
        desirable = sum(1 for row in trl_rows if row.get("label"))
        undesirable = len(trl_rows) - desirable
        if cfg.balance and desirable and undesirable:
            if undesirable > desirable:
                weights["desirable_weight"] = cfg.undesirable_weight * undesirable / desirable
            elif desirable > undesirable:
                weights["undesirable_weight"] = cfg.desirable_weight * desirable / undesirable
        self._kto_weights = weights

    # -- shift and sessions -------------------------------------------------------------

    def shift(self, since: dict[str, torch.Tensor] | None = None) -> Shift:
        """L2 parameter shift of the adapter (from the base model, or from the snapshot ``since``)."""
        return adapter_shift(self.engine, since)

    def session_shift(self) -> float:
        return adapter_shift(self.engine, self.session_start).total

    def begin_session(self) -> None:
        """Start a new trust-region session from the weights now in the engine."""
        self.session_start = self.engine.snapshot()

    def reset(self) -> None:
        """Back to the freshly attached adapter (zero shift), and a new session."""
        self.engine.reset_adapter()
        self.begin_session()

    # -- TRL plumbing ---------------------------------------------------------------------

    def _training_args(self, objective: str, batch_size: int):
        from trl import DPOConfig, KTOConfig, SFTConfig

        cfg = self.config
        device = str(self.engine.device)
        common = dict(
            output_dir=self._output_dir, max_steps=cfg.steps, per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=1, learning_rate=cfg.learning_rate, lr_scheduler_type="constant",
            warmup_steps=0, weight_decay=0.0, max_grad_norm=cfg.max_grad_norm, logging_steps=1,
            report_to="none", save_strategy="no", disable_tqdm=True, **_checkpointing(cfg.activation_checkpointing),
            dataloader_num_workers=0, seed=cfg.seed, data_seed=cfg.seed, max_length=cfg.max_length,
            use_cpu=device == "cpu",
            # TRL defaults to bf16=True; on a CPU without native bf16 that is ~13x slower (BENCHMARKS.md)
            **models.mixed_precision_flags(device, self.engine.model.dtype),
        )
        if objective == "sft":
            return SFTConfig(**common, completion_only_loss=True, packing=False)
        if objective in UNPAIRED:
            return KTOConfig(**common, beta=cfg.beta, loss_type=objective, **self._kto_weights)
        return DPOConfig(**common, beta=cfg.beta)

    def _trainer(self, objective: str, dataset, batch_size: int):
        """The objective's trainer, built once; later updates only swap in their prepared dataset."""
        from transformers.trainer_callback import PrinterCallback, ProgressCallback
        from trl import DPOTrainer, KTOTrainer, SFTTrainer

        trainer = self._trainers.get(objective)
        if trainer is not None:
            # the config may have changed since the trainer was built: hand it the new settings
            # (in place: building new TrainingArguments would reset the accelerator state it uses)
            args, cfg = trainer.args, self.config
            for name, value in _checkpointing(cfg.activation_checkpointing).items():
                setattr(args, name, value)
            for name, value in (("max_steps", cfg.steps), ("per_device_train_batch_size", batch_size),
                                ("learning_rate", cfg.learning_rate), ("max_grad_norm", cfg.max_grad_norm),
                                ("seed", cfg.seed), ("data_seed", cfg.seed), ("max_length", cfg.max_length),
                                ("beta", cfg.beta), ("desirable_weight", self._kto_weights["desirable_weight"]),
                                ("undesirable_weight", self._kto_weights["undesirable_weight"])):
                if hasattr(args, name):
                    setattr(args, name, value)
                if name in ("beta", "desirable_weight", "undesirable_weight") and hasattr(trainer, name):
                    setattr(trainer, name, value)
            trainer._train_batch_size = args.train_batch_size
            if objective == "sft":
                prepared = trainer._prepare_dataset(dataset, trainer.processing_class, args, args.packing, None,
                                                    "train")
            else:
                prepared = trainer._prepare_dataset(dataset, trainer.processing_class, args, "train")
            trainer.train_dataset = prepared
            trainer.optimizer, trainer.lr_scheduler = None, None  # each update starts a fresh optimizer
            return trainer
        cls = {"sft": SFTTrainer, "kto": KTOTrainer, "apo_zero_unpaired": KTOTrainer, "dpo": DPOTrainer}[objective]
        peft_model = self.engine.peft_model
        trainer = cls(model=peft_model, args=self._training_args(objective, batch_size), train_dataset=dataset,
                      processing_class=self.engine.tokenizer)
        if "ref" in peft_model.peft_config:
            # KTO/DPO copy the adapter into a "ref" adapter when handed a PeftModel; drop it, so the
            # reference policy is the adapter-disabled base model (TRL's fallback through PEFT).
            peft_model.delete_adapter("ref")
            peft_model.set_adapter("default")
        for callback in (PrinterCallback, ProgressCallback):
            trainer.remove_callback(callback)
        trainer.add_callback(self._guard.callback)
        self._trainers[objective] = trainer
        return trainer

    def _batch_size(self, objective: str, rows: int) -> int:
        """The configured batch size, or fewer when there are fewer rows: a batch that repeats a row costs
        compute and changes no gradient. KTO takes at least 2, as its KL estimate pairs completions across rows."""
        return min(self.config.batch_size, max(rows, 2 if objective == "kto" else 1))

    @staticmethod
    def _fill_batches(rows: list[dict], size: int) -> list[dict]:
        """Cycle the rows up to a whole number of batches (TRL's batch size is fixed per trainer)."""
        target = max(size, math.ceil(len(rows) / size) * size)
        return [rows[i % len(rows)] for i in range(target)]

    # -- the update -----------------------------------------------------------------------

    def update(self, rows: list[dict], objective: str | None = None,
               session_start: dict[str, torch.Tensor] | None = None) -> UpdateResult:
        """One update of the engine's adapter on ``rows``. ``session_start``: the adapter tensors the
        per-session trust region is measured from (default: those at :meth:`begin_session`)."""
        objective = objective or self.config.objective
        if objective not in OBJECTIVES:
            raise UpdateError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
        if objective == "kto" and self.config.batch_size < 2:
            raise UpdateError("kto needs batch_size >= 2")
        trl_rows = _to_trl(rows, objective)
        if not trl_rows:
            raise UpdateError(f"no usable {objective} rows (sft needs at least one desirable response)")
        from datasets import Dataset

        if objective in UNPAIRED:
            self._balance(trl_rows)
        engine = self.engine
        with engine.updating():
            before = engine.snapshot()
            shift_before = self.shift().total
            started = time.perf_counter()
            peft_model = engine.peft_model
            try:
                with _light_datasets():
                    size = self._batch_size(objective, len(trl_rows))
                    trainer = self._trainer(objective, Dataset.from_list(self._fill_batches(trl_rows, size)), size)
                prepared = time.perf_counter()
                self._guard.bad = ""
                # (the adapter at zero: this update starts from the base weights, the reference of its objective)
                if not self.config.activation_checkpointing and engine.model.is_activation_checkpointing:
                    engine.model.activation_checkpointing_disable()  # (another updater's; a Trainer only turns it on)
                from_reference = objective in UNPAIRED and engine.weights_id == engine.base_fingerprint
                # (the reference reuse outermost: it must see the whole row's inputs and outputs; the reply's tail
                # before the frozen prefix, which splits each row at its first scored column)
                tail = self.config.reply_tail if objective != "sft" else None  # (sft: a mean over the reply)
                # (the size check innermost: it must see the forward that takes gradients, a frozen prefix's suffix;
                # the reference's sharing inside the frozen prefix, which passes it the calls without gradients)
                large_only = self.config.activation_checkpointing and self.config.checkpointing_min_tokens > 0
                share = self.config.share_prefix
                with _score_completions_only(), \
                        _checkpoint_large_forwards(peft_model, self.config.checkpointing_min_tokens) \
                        if large_only else contextlib.nullcontext(), \
                        _reference_shares_prefix(peft_model) if share else contextlib.nullcontext(), \
                        _prompt_as_frozen_prefix(peft_model, self.config.prefix_per_row, share) \
                        if self.config.frozen_prompt else contextlib.nullcontext(), \
                        _score_reply_tail(peft_model, tail) if tail is not None else contextlib.nullcontext(), \
                        _reference_from_policy(peft_model) if from_reference else contextlib.nullcontext():
                    trainer.train()
                failpoint("update.trained")  # the adapter changed, the update not yet accepted
                losses = [float(h["loss"]) for h in trainer.state.log_history if "loss" in h]
                bad = self._guard.bad
                if not bad and any(not torch.isfinite(t).all() for t in engine.adapter_state().values()):
                    bad = "non-finite adapter weights after training"
                if bad:
                    engine.restore(before)
                    result = self._result(objective, rows, trainer, losses, started, prepared, shift_before,
                                          shift_before, 0.0, 1.0, True, f"rolled back: {bad}")
                else:
                    scaled_by = self._trust_region(before, session_start)
                    engine.mark_changed()
                    result = self._result(objective, rows, trainer, losses, started, prepared, shift_before,
                                          self.shift().total, self.shift(before).total, scaled_by, False,
                                          "" if scaled_by == 1.0 else f"trust region: scaled by {scaled_by:.3f}")
            except BaseException:
                engine.restore(before)  # never leave the adapter half-updated (also on KeyboardInterrupt)
                raise
            finally:
                peft_model.eval()
        self.history.append(result)
        return result

    def _result(self, objective, rows, trainer, losses, started, prepared, shift_before, shift_after,
                update_shift, scaled_by, rolled_back, reason) -> UpdateResult:
        return UpdateResult(objective=objective, rows=len(rows), steps=int(trainer.state.global_step),
                            losses=[round(x, 6) for x in losses], seconds=round(time.perf_counter() - started, 4),
                            prepare_seconds=round(prepared - started, 4), shift_before=shift_before,
                            shift_after=shift_after, update_shift=update_shift, scaled_by=scaled_by,
                            rolled_back=rolled_back, reason=reason)

    def _trust_region(self, before: dict[str, torch.Tensor], session_start: dict | None = None) -> float:
        """Pull the update back along the line before -> after until both bounds hold; returns the factor."""
        cfg = self.config
        if cfg.max_shift_per_update is None and cfg.max_shift_per_session is None:
            return 1.0
        engine = self.engine
        session_start = session_start if session_start is not None else self.session_start
        after = {name: t.detach().clone() for name, t in engine.adapter_state().items()}

        def at(t: float) -> dict[str, torch.Tensor]:
            return {name: before[name] + t * (after[name] - before[name]) for name in after}

        def excess(t: float) -> float:
            state = at(t)
            ratios = []
            if cfg.max_shift_per_update is not None:
                ratios.append(adapter_shift(engine, before, state).total / cfg.max_shift_per_update)
            if cfg.max_shift_per_session is not None:
                ratios.append(adapter_shift(engine, session_start, state).total / cfg.max_shift_per_session)
            return max(ratios)

        if excess(1.0) <= 1.0:
            return 1.0
        low, high = 0.0, 1.0
        for _ in range(40):
            mid = (low + high) / 2
            if excess(mid) <= 1.0:
                low = mid
            else:
                high = mid
        engine.restore(at(low))
        return low
