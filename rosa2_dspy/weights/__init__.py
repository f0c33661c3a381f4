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

The package, one job per module:

* :mod:`~rosa2_dspy.weights.config`: :class:`UpdateConfig`, the objectives, :class:`UpdateError` and the results;
* :mod:`~rosa2_dspy.weights.rows`: training rows (SFT, KTO, DPO) and their conversion to TRL's format;
* :mod:`~rosa2_dspy.weights.shift`: the adapter's L2 shift and sequence log-probabilities;
* :mod:`~rosa2_dspy.weights.updater`: :class:`LoRAUpdater`, the in-place TRL update with its trust region;
* :mod:`~rosa2_dspy.weights.finetune`: the engine lookup, DSPy's finetune provider and :class:`LoRAFinetune`;

and here the names they export.
"""

from __future__ import annotations

from rosa2_dspy.weights.config import (  # noqa: F401
    OBJECTIVES, UNPAIRED, Shift, UpdateConfig, UpdateError, UpdateResult,
)
from rosa2_dspy.weights.finetune import (  # noqa: F401
    BootstrapFinetune, LocalProvider, LocalTrainingJob, LoRAFinetune, engine_of, local_finetunable_lm,
    solution_rows_for, trace_passed, traces_to_rows,
)
from rosa2_dspy.weights.rows import _to_trl, dpo_row, kto_row, rows_from_chat, sft_row  # noqa: F401
from rosa2_dspy.weights.shift import adapter_shift, sequence_logprob  # noqa: F401
from rosa2_dspy.weights.updater import LoRAUpdater  # noqa: F401
