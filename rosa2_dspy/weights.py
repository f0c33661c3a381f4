"""Weights: on-the-fly LoRA updates of the engine's adapter through TRL, with shift accounting.

ROSA2's "capacity gradient" is a small LoRA update of the model behind the program, made
during a run (once per failed turn at test time, once per round at compile time). This
module makes that update cheap, safe and measured:

* :class:`LoRAUpdater` trains the adapter that lives in a :class:`~rosa2_dspy.engine.LocalEngine`
  in place, with TRL's ``SFTTrainer`` (desirable responses), ``KTOTrainer`` (binary feedback;
  the reference policy is the adapter-disabled base model through PEFT) or ``DPOTrainer``
  (chosen/rejected pairs). One trainer per objective is built on first use and reused: no
  model reload, no re-wrapping, no checkpoint per update; each update only tokenises its own
  rows (TRL's own dataset preparation) and runs a few optimizer steps.
* :meth:`LoRAUpdater.shift` is the L2 (Frobenius) norm of the weight change the adapter
  represents, ``sqrt(sum_modules ||scaling * B @ A||_F^2)``, per module too.
* A trust region bounds the shift of one update and of a session: an update that goes past it
  is pulled back along the straight line from the weights before it to the boundary; an update
  whose loss turns NaN/inf, or that is interrupted, is rolled back to the exact weights before it.
* :class:`LoRAFinetune` is the compile-time weights optimizer (a ``dspy.Teleprompter``), and
  :class:`LocalProvider` lets ``dspy.BootstrapFinetune`` train through the same updater.
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import dspy
import torch
from dspy.clients.provider import Provider, TrainingJob
from dspy.teleprompt.teleprompt import Teleprompter

from rosa2_dspy import models
from rosa2_dspy.engine import LocalEngine, LocalLM, lora_layers, release_free_memory
from rosa2_dspy.faults import failpoint

logger = logging.getLogger(__name__)

OBJECTIVES = ("sft", "kto", "apo_zero_unpaired", "dpo")
# unpaired objectives: rows of (prompt, completion, label); both run on TRL's KTOTrainer, apo_zero_unpaired as its
# loss_type, which drops KTO's KL reference point and with it the two KL forwards per step (and batch >= 2)
UNPAIRED = ("kto", "apo_zero_unpaired")


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

    def lora_config(self):
        from peft import LoraConfig

        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=self.target_modules, task_type="CAUSAL_LM")


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


# ----------------------------------------------------------------------------- training rows


def sft_row(prompt: list[dict], response: str) -> dict:
    return {"prompt": prompt, "completion": response, "label": True}


def kto_row(prompt: list[dict], response: str, desirable: bool) -> dict:
    return {"prompt": prompt, "completion": response, "label": bool(desirable)}


def dpo_row(prompt: list[dict], chosen: str, rejected: str) -> dict:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def rows_from_chat(items: Iterable[dict]) -> list[dict]:
    """DSPy's chat fine-tuning format (``{"messages": [..., assistant]}``) to SFT rows."""
    rows = []
    for item in items:
        messages = list(item.get("messages") or [])
        if not messages or messages[-1].get("role") != "assistant":
            raise UpdateError("each chat training item must end with an assistant message")
        rows.append(sft_row(messages[:-1], messages[-1]["content"]))
    return rows


def _to_trl(rows: list[dict], objective: str) -> list[dict]:
    """Rows to TRL's conversational prompt/completion format (loss on the completion tokens only)."""
    out = []
    for row in rows:
        prompt = [{"role": m["role"], "content": m["content"]} for m in row["prompt"]]
        if objective == "dpo":
            if "chosen" not in row or "rejected" not in row:
                raise UpdateError("dpo rows need 'chosen' and 'rejected'")
            out.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": row["chosen"]}],
                        "rejected": [{"role": "assistant", "content": row["rejected"]}]})
            continue
        if "completion" not in row:
            raise UpdateError(f"{objective} rows need 'completion' (and 'label')")
        if objective == "sft" and not row.get("label", True):
            continue  # SFT learns from desirable responses only
        item = {"prompt": prompt, "completion": [{"role": "assistant", "content": row["completion"]}]}
        if objective in UNPAIRED:
            item["label"] = bool(row.get("label", True))
        out.append(item)
    return out


# ----------------------------------------------------------------------------- shift


def _factors(modules: dict, state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """module name -> (A, B, scaling) taken from an adapter state dict (live or snapshot)."""
    out = {}
    for name, module in modules.items():
        a = state[f"{name}.lora_A.default.weight"]
        b = state[f"{name}.lora_B.default.weight"]
        out[name] = (a, b, float(module.scaling["default"]))
    return out


def _diff_norm_sq(a1, b1, a0, b0, scaling: float) -> float:
    """||s (B1 A1 - B0 A0)||_F^2 from the factors, without forming the big matrices.

    With U = [B1, -B0] and V = [A1; A0], B1 A1 - B0 A0 = U V and ||U V||^2 = sum((U^T U) * (V V^T)).
    """
    u = torch.cat([b1, -b0], dim=1).double() if b0 is not None else b1.double()
    v = torch.cat([a1, a0], dim=0).double() if a0 is not None else a1.double()
    value = float(((u.T @ u) * (v @ v.T)).sum()) * scaling * scaling
    return max(value, 0.0)


def adapter_shift(engine: LocalEngine, since: dict[str, torch.Tensor] | None = None,
                  state: dict[str, torch.Tensor] | None = None) -> Shift:
    """L2 norm of the weight change of ``state`` (default: the live adapter) relative to ``since``
    (default: the base model, i.e. ``sqrt(sum ||scaling B A||^2)``)."""
    if engine.peft_model is None:
        return Shift(0.0, {})
    modules = lora_layers(engine.peft_model)
    # the live adapter is read under the weights lock; given tensors (pinned snapshots) need no lock, so a
    # conversation ending never waits for a batch that is generating
    live = engine.weights_lock if state is None else contextlib.nullcontext()
    with live, torch.no_grad():
        now = _factors(modules, state if state is not None else engine.adapter_state())
        ref = _factors(modules, since) if since is not None else None
        per = {}
        for name, (a1, b1, s) in now.items():
            a0, b0 = (ref[name][0], ref[name][1]) if ref is not None else (None, None)
            per[name] = math.sqrt(_diff_norm_sq(a1, b1, a0, b0, s))
    return Shift(math.sqrt(sum(v * v for v in per.values())), per)


def sequence_logprob(engine: LocalEngine, prompt: list[dict], completion: str) -> float:
    """Sum of the log-probabilities of ``completion`` as the assistant's reply to ``prompt``."""
    prompt_ids = engine.encode_chat(prompt)
    completion_ids = engine.tokenizer.encode(completion, add_special_tokens=False)
    ids = torch.tensor([prompt_ids + completion_ids], device=engine.device)
    with engine.weights_lock, torch.no_grad():
        logits = engine.model(input_ids=ids).logits[0, len(prompt_ids) - 1:-1].float()
    logps = torch.log_softmax(logits, dim=-1)
    return float(logps.gather(1, torch.tensor(completion_ids, device=engine.device)[:, None]).sum())


# ----------------------------------------------------------------------------- the updater


class _LossGuard:
    """A TrainerCallback that stops training at the first non-finite loss or gradient norm."""

    def __init__(self):
        from transformers import TrainerCallback

        guard = self

        class _Callback(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                for key in ("loss", "grad_norm"):
                    value = (logs or {}).get(key)
                    if value is not None and not math.isfinite(float(value)):
                        guard.bad = f"non-finite {key} ({value}) at step {state.global_step}"
                        control.should_training_stop = True
                return control

        self.bad = ""
        self.callback = _Callback()


@contextlib.contextmanager
def _quiet_datasets():
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


class LoRAUpdater:
    """Small LoRA updates of a running engine's adapter, in place, through TRL.

    ``update(rows)`` takes rows built with :func:`sft_row`, :func:`kto_row` or :func:`dpo_row`
    (chat messages plus a label) and returns an :class:`UpdateResult`. The engine's
    ``weights_lock`` is held for the whole update, so no generation sees half-updated weights.
    """

    def __init__(self, engine: LocalEngine, config: UpdateConfig | None = None):
        self.engine = engine
        self.config = config or UpdateConfig()
        engine.attach_adapter(self.config.lora_config(), seed=self.config.seed)
        self._trainers: dict[str, Any] = {}
        self._guard = _LossGuard()
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
            report_to="none", save_strategy="no", disable_tqdm=True, gradient_checkpointing=False,
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
                with _quiet_datasets():
                    size = self._batch_size(objective, len(trl_rows))
                    trainer = self._trainer(objective, Dataset.from_list(self._fill_batches(trl_rows, size)), size)
                prepared = time.perf_counter()
                self._guard.bad = ""
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
                release_free_memory()
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


# ----------------------------------------------------------------------------- engine lookup


def engine_of(program: dspy.Module | None = None, lm: Any = None) -> LocalEngine:
    """The LocalEngine behind an LM, a program's predictors, or DSPy's configured LM."""
    candidates = [lm] if lm is not None else []
    if program is not None:
        candidates += [p.lm for p in program.predictors() if p.lm is not None]
    candidates.append(dspy.settings.lm)
    for candidate in candidates:
        if isinstance(candidate, LocalLM):
            return candidate.engine_ref
    raise UpdateError("weights optimisation needs a local model: configure dspy with LocalEngine(...).lm()")


# ----------------------------------------------------------------------------- DSPy provider


class LocalTrainingJob(TrainingJob):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.result_update: UpdateResult | None = None
        self.held: tuple[LocalEngine, str] | None = None

    def set_result(self, result) -> None:
        super().set_result(result)
        if self.held is not None:  # the finetuned LM holds its weights now (or finetuning failed): let go
            engine, ident = self.held
            self.held = None
            engine.unpin(ident)

    def status(self) -> str:
        return "done" if self.done() else "running"


class LocalProvider(Provider):
    """A finetunable DSPy provider that trains the engine's adapter through :class:`LoRAUpdater`.

    ``dspy.BootstrapFinetune`` calls ``lm.finetune(...)``; with this provider that runs an SFT
    update on the local engine and returns an LM pinned to the new weights.
    """

    def __init__(self, config: UpdateConfig | None = None):
        super().__init__()
        self.finetunable = True
        self.TrainingJob = LocalTrainingJob
        self.config = config
        self._updaters: dict[int, LoRAUpdater] = {}

    def updater(self, engine: LocalEngine, config: UpdateConfig | None = None) -> LoRAUpdater:
        key = id(engine)
        if key not in self._updaters:
            self._updaters[key] = LoRAUpdater(engine, config or self.config or UpdateConfig(objective="sft"))
        return self._updaters[key]

    @staticmethod
    def is_provider_model(model: str) -> bool:
        return model.startswith("local/")

    def launch(self, lm, launch_kwargs=None):
        """Nothing to launch: the engine is in process."""

    def kill(self, lm, launch_kwargs=None):
        """Nothing to kill: the engine is shared and stays loaded."""

    def finetune(self, job, model, train_data, train_data_format=None, train_kwargs=None) -> str:
        from dspy.clients.utils_finetune import TrainDataFormat

        if train_data_format not in (None, TrainDataFormat.CHAT, "chat"):
            raise UpdateError(f"the local provider trains on chat data, got {train_data_format}")
        engine = _engine_for_model(model)
        overrides = dict(train_kwargs or {})
        config = UpdateConfig.from_dict({**asdict(self.config or UpdateConfig(objective="sft")), **overrides,
                                         "objective": "sft"})
        updater = self.updater(engine, config)
        updater.config = config
        rows = rows_from_chat(train_data)
        if not rows:
            raise UpdateError("no training data: no bootstrapped trace passed the metric")
        job.result_update = updater.update(rows)
        # held until DSPy has made the LM that names these weights (it takes its own hold): see set_result
        job.held = (engine, engine.pin())
        return f"{model.split('@', 1)[0]}@{job.held[1]}"


_ENGINES_BY_NAME: dict[str, LocalEngine] = {}


def _engine_for_model(model: str) -> LocalEngine:
    name = model.split("/", 1)[-1].split("@", 1)[0]
    if name in _ENGINES_BY_NAME:
        return _ENGINES_BY_NAME[name]
    raise UpdateError(f"no local engine named {name!r}; build the LM with local_finetunable_lm(engine)")


def local_finetunable_lm(engine: LocalEngine, config: UpdateConfig | None = None, **kwargs) -> LocalLM:
    """A ``LocalLM`` whose provider fine-tunes the engine in place (for ``dspy.BootstrapFinetune``)."""
    _ENGINES_BY_NAME[engine.name] = engine
    return engine.lm(provider=LocalProvider(config), **kwargs)


# ----------------------------------------------------------------------------- compile-time optimizer


def traces_to_rows(trace_data: list[dict], adapter: dspy.Adapter | None = None, keep: str = "passed",
                   objective: str = "sft") -> list[dict]:
    """Bootstrapped traces (``dspy.teleprompt.bootstrap_trace.bootstrap_trace_data``) to training rows.

    Every predictor call of a kept trace becomes one row: the adapter's prompt messages and the
    reply it produced. ``keep="passed"`` keeps traces whose score is truthy; with ``kto`` or
    ``apo_zero_unpaired`` the others become undesirable rows.
    """
    from dspy.teleprompt.bootstrap_finetune import build_call_data_from_trace

    adapter = adapter or dspy.settings.adapter or dspy.ChatAdapter()
    rows = []
    for item in trace_data:
        passed = trace_passed(item)
        if not passed and not (objective in UNPAIRED and keep == "passed"):
            continue
        for index in range(len(item.get("trace") or [])):
            try:
                data = build_call_data_from_trace(trace=item["trace"], pred_ind=index, adapter=adapter)
            except Exception as exc:  # noqa: BLE001 - e.g. a failed parse: no outputs to train on
                logger.debug("skipping a trace that cannot be formatted: %s", exc)
                continue
            messages = data["messages"]
            rows.append(kto_row(messages[:-1], messages[-1]["content"], passed))
    return rows


def trace_passed(item: dict) -> bool:
    """A bootstrapped trace passed its metric: a positive score (DSPy scores a failed parse -1, which is truthy)."""
    score = item.get("score")
    return score is not None and float(score) > 0


class BootstrapFinetune(dspy.BootstrapFinetune):
    """``dspy.BootstrapFinetune`` that trains only on traces that passed (:func:`trace_passed`).

    DSPy keeps traces with a truthy score, so a failed parse (score -1) is kept, and formatting its
    ``FailedPrediction`` then stops the whole step (``AttributeError: ... no attribute 'get'``). On a
    small model that fails most parses, that is every BetterTogether ``w`` step."""

    def _prepare_finetune_data(self, trace_data, lm, pred_ind=None):
        return super()._prepare_finetune_data([d for d in trace_data if trace_passed(d)], lm, pred_ind)


def solution_rows_for(program: dspy.Module, examples: list, adapter: dspy.Adapter | None = None) -> list[dict]:
    """SFT rows from reference solutions: each answering predictor's prompt, the example's worked solution.

    For datasets that carry worked solutions (MATH train does), this teaches the format and the
    method directly, where bootstrapping finds too few passing traces on a small model.
    """
    adapter = adapter or dspy.settings.adapter or dspy.ChatAdapter()
    rows = []
    for _, predictor in program.named_predictors():
        signature = predictor.signature
        if "answer" not in signature.output_fields:
            continue
        for example in examples:
            solution = example.get("solution") if hasattr(example, "get") else None
            inputs = {name: example.get(name) for name in signature.input_fields}
            if not solution or any(value is None for value in inputs.values()):
                continue
            outputs = {"reasoning": solution, "answer": example.get("answer")}
            data = adapter.format_finetune_data(signature=signature, demos=list(predictor.demos), inputs=inputs,
                                                outputs=outputs)
            messages = data["messages"]
            rows.append(sft_row(messages[:-1], messages[-1]["content"]))
    return rows


class LoRAFinetune(Teleprompter):
    """Compile-time weights optimizer: bootstrap traces, keep those that pass, update the adapter.

    Works on its own (``compile(student, trainset=...)``) and as the ``w`` step of DSPy's
    ``BetterTogether``. The returned program's predictors use an LM pinned to the new weights.
    """

    def __init__(self, metric, config: UpdateConfig | None = None, num_threads: int | None = None,
                 adapter: dspy.Adapter | None = None, samples_per_example: int = 1, temperature: float = 0.7,
                 sources: tuple[str, ...] | list[str] = ("bootstrap",)):
        super().__init__()
        unknown = set(sources) - {"bootstrap", "solutions"}
        if unknown or not sources:
            raise UpdateError(f"sources must be among 'bootstrap', 'solutions', got {list(sources)}")
        self.metric = metric
        self.config = config or UpdateConfig(objective="sft")
        self.num_threads = num_threads
        self.adapter = adapter
        self.samples_per_example = samples_per_example
        self.temperature = temperature
        self.sources = tuple(sources)
        self.history: list[dict] = []
        self.updater: LoRAUpdater | None = None

    def compile(self, student: dspy.Module, *, trainset: list, teacher=None, valset=None) -> dspy.Module:
        from dspy.teleprompt.bootstrap_trace import bootstrap_trace_data

        if not trainset:
            raise UpdateError("LoRAFinetune needs a non-empty trainset")
        engine = engine_of(student)
        base_lm = next((p.lm for p in student.predictors() if isinstance(p.lm, LocalLM)), None) \
            or dspy.settings.lm
        self.updater = self.updater if self.updater and self.updater.engine is engine else \
            LoRAUpdater(engine, self.config)
        program = (teacher or student).deepcopy()
        adapter = self.adapter or getattr(student, "adapter", None) or dspy.settings.adapter
        traces = []
        for sample in range(self.samples_per_example if "bootstrap" in self.sources else 0):
            # sample 0 is the program as it is; further samples draw at a temperature, each its own rollout
            lm = base_lm if sample == 0 else base_lm.copy(temperature=self.temperature, rollout_id=sample)
            sampler = program.deepcopy()
            sampler.set_lm(lm)
            traces += bootstrap_trace_data(program=sampler, dataset=trainset, metric=self.metric,
                                           num_threads=self.num_threads or 8, raise_on_error=False)
        rows = traces_to_rows(traces, adapter, objective=self.config.objective)
        passed = sum(1 for t in traces if (t.get("score") or 0) > 0)
        solution_rows = solution_rows_for(student, trainset, adapter) if "solutions" in self.sources else []
        rows += solution_rows
        record = {"traces": len(traces), "passed": passed, "solution_rows": len(solution_rows), "rows": len(rows)}
        if not any(r["label"] for r in rows):
            record["update"] = None
            record["note"] = "no trace passed the metric: the adapter was left unchanged"
            logger.warning(record["note"])
        else:
            record["update"] = self.updater.update(rows).to_dict()
        self.history.append(record)
        compiled = student.deepcopy()
        pinned = base_lm.copy()
        ident = engine.pin()
        pinned.model = f"{base_lm.model.split('@', 1)[0]}@{ident}"  # the LM takes its own hold on the weights
        engine.unpin(ident)
        compiled.set_lm(pinned)
        compiled._compiled = True
        return compiled
