"""Optimizer recipes: TOML files in ``optimizers/`` that name a teleprompter and its settings.

    [optimizer]
    kind = "lora"          # lora | words | gepa | rosa2 | better-together | session
    ...                    # the optimizer's own settings
    [update]               # LoRA update settings (weights.UpdateConfig) for kinds that train
    [critic]
    model = "engine"       # the critic/reflection LM: the local engine, or a dspy.LM model id

A recipe may start from another: ``extends = "rosa2-compile.toml"`` at the top, then only what differs.

``build_optimizer`` turns a recipe into a ``dspy.Teleprompter`` bound to a metric and engine.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KINDS = ("lora", "words", "gepa", "rosa2", "p-then-w", "better-together")


class RecipeError(ValueError):
    """A recipe that cannot be read or used (one line, exit 2)."""


@dataclass
class Recipe:
    path: str
    kind: str
    optimizer: dict[str, Any]
    update: dict[str, Any] = field(default_factory=dict)
    critic: dict[str, Any] = field(default_factory=dict)
    text: str = ""

    def to_dict(self) -> dict:
        return {"path": self.path, "kind": self.kind, "optimizer": self.optimizer, "update": self.update,
                "critic": self.critic}


def load_recipe(path: str | Path, kinds: tuple[str, ...] = KINDS) -> Recipe:
    """Read a recipe. ``extends = "other.toml"`` (beside it) starts from that recipe: each table's keys
    are the other's, overridden by this file's; the recipe's ``text`` is both files, so a change to
    either one is a change to the recipe."""
    path = Path(path)
    data, text = read_tables(path)
    optimizer = dict(data.get("optimizer") or {})
    kind = optimizer.pop("kind", None)
    if kind not in kinds:
        raise RecipeError(f"{path}: [optimizer] kind must be one of {', '.join(kinds)}, got {kind!r}")
    unknown = sorted(set(data) - {"optimizer", "update", "critic", "session", "user"})
    if unknown:
        raise RecipeError(f"{path}: unknown table(s) {', '.join(unknown)}")
    return Recipe(str(path), kind, optimizer, dict(data.get("update") or {}), dict(data.get("critic") or {}), text)


def read_tables(path: str | Path, seen: set[Path] | None = None) -> tuple[dict, str]:
    """A recipe file's tables with any ``extends`` chain merged in (tables key by key, nested tables too), and
    the chain's text (base first)."""
    path, seen = Path(path), set() if seen is None else seen
    if not path.is_file():
        raise RecipeError(f"no recipe at {path} (see optimizers/ for the shipped ones)")
    if path.resolve() in seen:
        raise RecipeError(f"{path}: recipes extend each other in a loop")
    seen.add(path.resolve())
    text = path.read_text()
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{path} is not valid TOML: {exc}") from None
    base = data.pop("extends", None)
    if base is None:
        return data, text
    if not isinstance(base, str):
        raise RecipeError(f"{path}: extends must name a recipe file, got {base!r}")
    merged, base_text = read_tables(path.parent / base, seen)
    return _merged(merged, data), f"{base_text}\n# --- {path.name}\n{text}"


def _merged(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def critic_lm(recipe: Recipe, engine):
    """The critic / reflection LM a recipe names: the local engine (default) or a dspy.LM id."""
    import dspy

    model = recipe.critic.get("model", "engine")
    settings = {k: v for k, v in recipe.critic.items() if k != "model"}
    if model == "engine":
        settings.setdefault("max_tokens", 384)
        return engine.lm(pinned=True, cache=False, **settings)
    return dspy.LM(model, **settings)


def update_config(recipe: Recipe, **defaults):
    from rosa2_dspy.weights import UpdateConfig

    return UpdateConfig.from_dict({**defaults, **recipe.update})


def build_optimizer(recipe: Recipe, engine, *, num_threads: int = 8):
    """The teleprompter a recipe describes, with our MATH metrics."""
    import dspy

    from rosa2_dspy.weights import LoRAFinetune

    settings = dict(recipe.optimizer)
    try:
        if recipe.kind == "lora":
            from rosa2_dspy.evaluation import math_metric

            keep = settings.pop("keep", "correct")
            return LoRAFinetune(math_metric(keep), config=update_config(recipe, objective="sft"),
                                num_threads=num_threads, **settings)
        if recipe.kind == "words":
            from rosa2_dspy.math.feedback import math_feedback_metric
            from rosa2_dspy.words import TextualGradientOptimizer

            return TextualGradientOptimizer(metric=math_feedback_metric, critic_lm=critic_lm(recipe, engine),
                                            **{"num_threads": num_threads, **settings})
        if recipe.kind == "gepa":
            return _gepa(recipe, engine, settings, num_threads)
        if recipe.kind == "rosa2":
            from rosa2_dspy.teleprompt import ROSA2
            from rosa2_dspy.math.feedback import math_feedback_metric

            return ROSA2(metric=math_feedback_metric, critic_lm=critic_lm(recipe, engine),
                         config=update_config(recipe, objective="sft"), num_threads=num_threads, **settings)
        if recipe.kind == "p-then-w":
            from rosa2_dspy.teleprompt import Sequential
            from rosa2_dspy.evaluation import math_metric
            from rosa2_dspy.math.feedback import math_feedback_metric
            from rosa2_dspy.words import TextualGradientOptimizer

            keep, sources = settings.pop("keep", "correct"), settings.pop("sources", ("bootstrap",))
            words = TextualGradientOptimizer(metric=math_feedback_metric, critic_lm=critic_lm(recipe, engine),
                                             **{"num_threads": num_threads, **settings})
            weights = LoRAFinetune(math_metric(keep), config=update_config(recipe, objective="sft"),
                                   num_threads=num_threads, sources=sources)
            return Sequential(words, weights)
        if recipe.kind == "better-together":
            return _better_together(recipe, engine, settings, num_threads)
    except TypeError as exc:  # an unknown key in the [optimizer] table
        raise RecipeError(f"{recipe.path}: {exc}") from None
    raise RecipeError(f"unknown recipe kind {recipe.kind!r}")


def _gepa(recipe: Recipe, engine, settings: dict, num_threads: int):
    """DSPy's GEPA with our feedback metric; its proposer reads the critic's whole reply as the instruction
    (GEPA's default asks for a fenced block that a small local critic rarely writes)."""
    import dspy

    from rosa2_dspy.math.feedback import math_feedback_metric
    from rosa2_dspy.words import plain_text_gepa_proposer

    settings = dict(settings)
    settings.setdefault("component_selector", "all")  # a predictor the program never calls gets no turns
    return dspy.GEPA(metric=math_feedback_metric, reflection_lm=critic_lm(recipe, engine), num_threads=num_threads,
                     instruction_proposer=plain_text_gepa_proposer(), **settings)


def _better_together(recipe: Recipe, engine, settings: dict, num_threads: int):
    """DSPy's BetterTogether with p = GEPA (or our words optimizer) and w = BootstrapFinetune (on passing traces
    only) through our provider."""
    import dspy

    from rosa2_dspy.evaluation import math_metric
    from rosa2_dspy.weights import BootstrapFinetune
    from rosa2_dspy.math.feedback import math_feedback_metric
    from rosa2_dspy.words import TextualGradientOptimizer

    p_kind = settings.pop("p", "gepa")
    p_settings = dict(settings.pop("p_settings", {}))
    keep = settings.pop("keep", "correct")
    if p_kind == "gepa":
        p = _gepa(recipe, engine, p_settings, num_threads)
    elif p_kind == "words":
        p = TextualGradientOptimizer(metric=math_feedback_metric, critic_lm=critic_lm(recipe, engine), **p_settings)
    else:
        raise RecipeError(f"{recipe.path}: p must be 'gepa' or 'words', got {p_kind!r}")
    w = BootstrapFinetune(metric=math_metric(keep), num_threads=num_threads)
    optimizer = dspy.BetterTogether(metric=math_metric("correct"), p=p, w=w)
    optimizer.compile_kwargs = settings  # strategy, valset_ratio ...: passed to compile()
    return optimizer
