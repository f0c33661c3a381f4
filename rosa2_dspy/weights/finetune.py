"""DSPy's side of the weights: the engine behind a program, the finetune provider that lets
``dspy.BootstrapFinetune`` train through :class:`~rosa2_dspy.weights.updater.LoRAUpdater`, and
:class:`LoRAFinetune`, the compile-time weights optimizer."""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

import dspy
from dspy.clients.provider import Provider, TrainingJob
from dspy.teleprompt.teleprompt import Teleprompter

from rosa2_dspy.engine import LocalEngine, LocalLM
from rosa2_dspy.weights.config import UNPAIRED, UpdateConfig, UpdateError, UpdateResult
from rosa2_dspy.weights.rows import kto_row, rows_from_chat, sft_row
from rosa2_dspy.weights.updater import LoRAUpdater

logger = logging.getLogger(__name__)


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
            self._updaters[key] = LoRAUpdater(engine, config or self.config or UpdateConfig(objective="sft"),
                                              progress=True)
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
            LoRAUpdater(engine, self.config, progress=True)
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
