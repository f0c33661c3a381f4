"""What one LoRA update does and what it reports: the objectives, :class:`UpdateConfig`,
:class:`UpdateError`, :class:`Shift` and :class:`UpdateResult`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

OBJECTIVES = ("sft", "kto", "apo_zero_unpaired", "dpo")
# unpaired objectives: rows of (prompt, completion, label); both run on TRL's KTOTrainer, apo_zero_unpaired as its
# loss_type, which drops KTO's KL reference point and with it the two KL forwards per step (and batch >= 2)
UNPAIRED = ("kto", "apo_zero_unpaired")
ADAPTER_DTYPES = ("float32", "model")


class UpdateError(ValueError):
    """Bad update data or configuration (user-facing, one line)."""


@dataclass
class UpdateConfig:
    """What one LoRA update does. Every field can be set from a recipe (``optimizers/*.toml``)."""

    objective: str = "kto"
    # the adapter (used when the engine has none yet)
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    # adapt only the last ``layers`` transformer blocks (None: every block): the backward pass then stops at the
    # lowest adapted block instead of running through the whole model
    layers: int | None = None
    # the adapter's dtype on a 16-bit model: "float32" (PEFT's default: each LoRA layer computes in float32, casting
    # its input up and its delta back) or "model" (the base weights' dtype: no casts, and half the adapter memory)
    adapter_dtype: str = "float32"
    # keep only each block's input and run the block's forward again in the backward pass (transformers' activation
    # checkpointing): memory for one more forward a step, the same update to the bit
    activation_checkpointing: bool = False
    # with activation_checkpointing, only an update forward over at least this many gradient tokens (rows x the
    # columns that take gradients) checkpoints; a smaller one keeps its activations, which are few, and is not
    # recomputed (0: every forward checkpoints). The update is the same to the bit either way
    checkpointing_min_tokens: int = 0
    # run each row's prompt once without gradients, as a cached prefix, and the forward and backward over the reply
    # only: cheaper by about the prompt's share of the row, and a different update (no gradient through the
    # prompt's own positions), so a design choice, not a free speed-up
    frozen_prompt: bool = False
    # with frozen_prompt, rows whose scored part starts at different columns (replies of different lengths under
    # reply_tail) each run on their own prefix (True), or all at the batch's earliest such column (False: a longer
    # reply's head then takes gradients, and a row's update depends on the other rows of its batch)
    prefix_per_row: bool = False
    # the columns every row of an update begins with (the prompt its rows share: a later update trains on each
    # rejected reply under one prompt) run once, on one row, and each row runs only up to its own last token, not
    # the longest row's (the reference forward, and with frozen_prompt the prefix and the gradient suffix, unless
    # prefix_per_row gives each row a prefix of its own): the same update, for less work, up to the rounding of
    # products over other row counts
    share_prefix: bool = False
    # score only the last N tokens of each reply (None or 0: all of it): the loss, and the reference's
    # log-probabilities, cover the reply's end, where its final answer is; with frozen_prompt the reply's head joins
    # the no-gradient prefix, so an update's gradient work no longer grows with the reply's length. A design
    # choice, like frozen_prompt: what the update learns from changes. The preference objectives (kto,
    # apo_zero_unpaired, dpo) sum log-probabilities over it; sft's loss is a mean over the whole reply, so sft
    # ignores it
    reply_tail: int | None = None
    # the optimisation
    steps: int = 4
    batch_size: int = 4
    learning_rate: float = 2e-4
    max_grad_norm: float = 1.0
    max_length: int = 1024
    beta: float = 0.1  # KTO / DPO: strength of the pull towards the reference (base) policy
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    seed: int = 0
    balance: bool = True  # KTO: weigh the scarcer label up so both kinds count equally (TRL's recommended range)
    # the trust region (None: unbounded)
    max_shift_per_update: float | None = None
    max_shift_per_session: float | None = None

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise UpdateError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        for name in ("steps", "batch_size", "r", "max_length"):
            if int(getattr(self, name)) < 1:
                raise UpdateError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.layers is not None and int(self.layers) < 1:
            raise UpdateError(f"layers must be >= 1 or unset (every block), got {self.layers}")
        if int(self.checkpointing_min_tokens) < 0:
            raise UpdateError(f"checkpointing_min_tokens must be >= 0 (0: every forward), got "
                              f"{self.checkpointing_min_tokens}")
        if self.reply_tail is not None and int(self.reply_tail) < 0:
            raise UpdateError(f"reply_tail must be >= 1, or 0 or unset (the whole reply), got {self.reply_tail}")
        if self.reply_tail == 0:
            self.reply_tail = None
        if self.adapter_dtype not in ADAPTER_DTYPES:
            raise UpdateError(f"adapter_dtype must be one of {', '.join(ADAPTER_DTYPES)}, got {self.adapter_dtype!r}")
        if self.objective == "kto" and self.batch_size < 2:
            raise UpdateError("kto needs batch_size >= 2 (its KL estimate pairs completions within a batch)")
        for name in ("max_shift_per_update", "max_shift_per_session"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise UpdateError(f"{name} must be > 0 or unset, got {value}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> UpdateConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise UpdateError(f"unknown update setting(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**values)

    def lora_config(self, model=None):
        """PEFT's ``LoraConfig`` for this update's adapter. ``model`` (the base model) is needed when ``layers`` picks
        the last blocks: PEFT takes ``layers_to_transform`` only with module names, so "all-linear" becomes the
        names of the linear layers inside the blocks."""
        from peft import LoraConfig

        targets, last = self.target_modules, None
        if self.layers is not None:
            blocks = getattr(getattr(model, "config", None), "num_hidden_layers", None)
            if not blocks:
                raise UpdateError("layers is set, but the model's number of transformer blocks is unknown")
            last = list(range(max(blocks - int(self.layers), 0), blocks))
            if targets == "all-linear":
                import torch

                targets = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                                  if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}"})
        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=targets, layers_to_transform=last, task_type="CAUSAL_LM")


@dataclass
class Shift:
    """The L2 norm of the weight change an adapter represents, total and per module."""

    total: float
    modules: dict[str, float] = field(default_factory=dict)

    def __float__(self) -> float:
        return self.total


@dataclass
class UpdateResult:
    objective: str
    rows: int
    steps: int
    losses: list[float]
    seconds: float
    prepare_seconds: float  # trainer construction (first update) plus this update's dataset preparation
    shift_before: float
    shift_after: float
    update_shift: float  # how far this update moved the weights
    scaled_by: float = 1.0  # < 1 when the trust region pulled the update back
    rolled_back: bool = False
    reason: str = ""

    def to_dict(self) -> dict:
        return asdict(self)
