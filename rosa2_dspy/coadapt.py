"""Co-adaptation at test time: ROSA2 multi-turn sessions (the compile-time optimizer is in teleprompt.py).

A session is one conversation about one problem (:meth:`Session.run`, the whole turn loop):

1. the program answers (turn 1 with the frozen or compiled adapter);
2. the user judges the shown answer; accepted: stop;
3. **words step**: the clarification module refines the prompt from the feedback and history;
4. **weights step**: a LoRA update on the interaction so far (:func:`session_update_config`),
   conditioned on the refined prompt: undesirable = the rejected replies re-paired with the new prompt;
   desirable = replies sampled under the new prompt that pass self-checks (boxed, parseable,
   agreeing with the majority of the samples, not an answer the user already rejected);
5. next turn, until accepted or the budget T ends. The adapter is restored after the session.

Conversations run concurrently (``run`` is thread-safe): each conversation's weights are a
pinned id on the engine (:meth:`~rosa2_dspy.engine.LocalEngine.pin`) and its program copy asks
for them by name, so conversations with different adapters still share batched generation
(each row's own LoRA update added in the batch); updates take the engine's weights one at a time,
announced (:meth:`~rosa2_dspy.engine.LocalEngine.updating`) so they land back to back ahead of generation.

The methods are one loop with steps switched on or off (:data:`POLICIES`): ``single`` (one
turn), ``whole`` (one turn on the whole problem, whatever the user withholds: the upper bound for a
sharded user), ``retry`` (no adaptation: the user's feedback appended, answered again by the same weights; the
control that says how much of ``pe``'s or ``ttt``'s gain the further turns alone bring), ``pe`` (words only), ``ttt`` (weights only; the raw feedback, revealed conditions
included, is appended to the user's first message), ``pe-then-ttt`` (words for the first half of the
budget, weights after, the update on the prompt the failed turn answered; at T = 2 one of each after turn 1)
and ``rosa2`` (both every turn, words first, the update on the rewritten prompt).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import time
import traceback
import zlib
from dataclasses import dataclass, replace
from typing import Any

import dspy
from dspy.utils.exceptions import AdapterParseError

from rosa2_dspy.engine import GenSettings, LocalEngine, LocalLM, count_usage, usage_scope
from rosa2_dspy.math.grading import answer_key, last_boxed
from rosa2_dspy.weights import LoRAUpdater, UpdateConfig, adapter_shift, kto_row
from rosa2_dspy.words.refinement import as_told, kept_words

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Policy:
    """Which adaptation steps run after a failed turn ``turn`` (1-based) of a budget of ``turns``."""

    name: str
    words: str = "never"  # never | always | first-half
    weights: str = "never"  # never | always | second-half
    single_turn: bool = False
    whole_problem: bool = False  # pose the whole problem whatever the user withholds (the upper bound)
    # the prompt the weights step pairs the rejected replies with: the one the next turn answers ("next": the
    # rewritten problem when a words step ran, ROSA2's update conditioned on the new words) or the one the
    # failed turn answered ("answered": an update that does not see the rewrite)
    weights_on: str = "next"

    def steps(self, turn: int, turns: int) -> tuple[bool, bool]:
        """(words step?, weights step?) after failed turn ``turn``. Steps happen after turns 1 .. turns-1; a
        first-half/second-half split with a single such point (T = 2) does one of each there."""
        if turns == 2 and self.words == "first-half" and self.weights == "second-half":
            return True, True
        half = turns // 2 if turns > 2 else 1
        words = self.words == "always" or (self.words == "first-half" and turn <= half)
        weights = self.weights == "always" or (self.weights == "second-half" and turn > half)
        return words, weights


POLICIES = {
    "single": Policy("single", single_turn=True),
    "whole": Policy("whole", single_turn=True, whole_problem=True),
    "retry": Policy("retry"),  # ttt's prompts without its updates
    "pe": Policy("pe", words="always"),
    "ttt": Policy("ttt", weights="always"),
    "pe-then-ttt": Policy("pe-then-ttt", words="first-half", weights="second-half", weights_on="answered"),
    "rosa2": Policy("rosa2", words="always", weights="always"),
}


def get_policy(name: str) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"unknown method {name!r}; choose from: {', '.join(POLICIES)}")
    return POLICIES[name]


def check_policy_settings(policy: Policy, config: SessionConfig) -> None:
    """Refuse settings that make a method's turns pointless: ``words_after = "first"`` keeps the words after the
    first words step, so a method must then take a weights step after every later failed turn (``rosa2``), or a
    turn could ask the same prompt on the same weights again (greedy: the same answer)."""
    if config.words_after == "first" and policy.words != "never" and policy.weights != "always":
        raise ValueError(f"{policy.name}: words_after=first needs a method that updates the weights after every "
                         f"failed turn (rosa2): {policy.name} would ask the same prompt on the same weights again")


@dataclass
class SessionConfig:
    turns: int = 3
    # replies sampled under the refined prompt, as candidate desirable responses; 0: the update trains on the
    # rejected replies alone (ROSA's update after a failure), as every train run behind the defaults and every
    # reported comparison ran it (BENCHMARKS.md, session 25)
    samples: int = 0
    sample_temperature: float = 0.8
    max_tokens: int = 384
    words_max_tokens: int = 128  # per words-step call (critique, clarified problem)
    # how the words step's rewrite is asked for and checked (rosa2_dspy.words.refine): "strict" asks for the
    # statement only and refuses a rewrite that solves the problem or drops a number; "lenient" (the first
    # design) keeps any rewrite that keeps one number of each piece, a solution included
    clarify_check: str = "strict"
    # what the words step does with the user's words (rosa2_dspy.words.refine): "replace" rewrites them into one
    # problem statement; "append" keeps them verbatim (the prompt retry answers) and adds a clarification below
    clarify_mode: str = "replace"
    # which failed turns take the words step the method's policy schedules: "every" one, or the "first" only (later
    # turns keep those words, plus what the user revealed since, and a weights step trains on them)
    words_after: str = "every"
    keep_adapter: bool = False  # keep the adapter after the conversation (continual use)
    seed: int = 0


def _answer_predictor(program: dspy.Module):
    for name, predictor in program.named_predictors():
        if "answer" in predictor.signature.output_fields:
            return name, predictor
    raise ValueError("the program has no predictor with an 'answer' output")


@dataclass
class Conversation:
    """One conversation's own state: a copy of the program whose LM asks for this conversation's
    weights (a pinned id), and the adapter tensors it started from (for its shift and trust region)."""

    example: Any
    program: dspy.Module
    lm: LocalLM
    weights: str
    start_state: dict

    def move_to(self, engine: LocalEngine, weights: str) -> None:
        """Answer with ``weights`` (already pinned by the caller) from now on; release the old ones."""
        old, self.weights = self.weights, weights
        self.lm.model = f"{self.lm.model.partition('@')[0]}@{weights}"
        engine.unpin(old)


SESSION_OBJECTIVE = "apo_zero_unpaired"


def session_update_config(**overrides) -> UpdateConfig:
    """The weights step's update: one optimizer step on the turn's rows, from the conversation's weights.

    The objective is TRL's ``KTOTrainer`` with ``loss_type="apo_zero_unpaired"``: ROSA's update after a
    failure (the rejected reply pushed down relative to the reference, the base weights, with strength
    ``beta``; desirable samples, when any pass the self-checks, pulled up). KTO's KL reference point is
    zero at a conversation's first update (its adapter starts at the reference) and small after, so
    dropping it changes the update little; it saves KTO's two KL forwards per step and its batch of
    at least 2, in which a turn's lone rejected reply would be repeated (BENCHMARKS.md: 2.6x faster on
    one row, 1.4x on two, the same L2 shift). ``objective="kto"`` restores KTO. A batch holds up to 4 rows
    (never more than there are), so a turn's rows, rejected and desirable, share its one step when
    T <= 3 and samples <= 2. ``max_length`` (prompt plus reply tokens; TRL cuts longer rows from the right)
    must cover a whole reply, or the update never sees the final answer it is about: the default fits a
    1024-token reply. The update scores each reply's last 128 tokens (``reply_tail``), where its final answer
    is, and runs the prompt and the reply's head once without gradients (``frozen_prompt``): 1.8-2.7x cheaper
    than whole rows on the 1.5B default, and no worse on MATH train problems (BENCHMARKS.md, session 22). A
    forward over at least 384 gradient tokens (a reply's head beside a shorter one's tail) checkpoints its
    blocks: the same update, a long one's activations 4.2 GB instead of 10.4 at 1.04x its time, an uneven later
    one's 3.8 instead of 5.9 at 0.9x, and a turn's usual rows (about 129 gradient tokens each) stay under it
    (BENCHMARKS.md, session 25). A later update's rows (every rejected reply so far, under one prompt) run that
    prompt once, on one row, and each row only to its own last token (``share_prefix``): the same update up to
    rounding, 0.70x a first update's time and 0.76x a later one's on two uneven replies (BENCHMARKS.md, session 31).
    ``None`` overrides are ignored."""
    values = dict(objective=SESSION_OBJECTIVE, steps=1, batch_size=4, learning_rate=2e-4, max_length=1536,
                  frozen_prompt=True, reply_tail=128, share_prefix=True, activation_checkpointing=True,
                  checkpointing_min_tokens=384)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return UpdateConfig(**values)


def _sample_seed(seed: int, unique_id: str, turn: int, index: int) -> int:
    """A sampling seed per (run seed, problem, turn, sample): runs repeat, problems differ."""
    return zlib.crc32(f"{seed}/{unique_id}/{turn}/{index}".encode())


class Session:
    """Runs conversations for one method on one engine; the adapter is per conversation.

    ``run`` may be called from many threads at once (see the module docstring); with
    ``keep_adapter`` (continual use) each conversation starts from the last one's weights, so run
    those one at a time."""

    def __init__(self, program: dspy.Module, engine: LocalEngine, policy: Policy | str, user,
                 config: SessionConfig | None = None, update: UpdateConfig | None = None, critic_lm=None,
                 updater: LoRAUpdater | None = None):
        self.program = program
        self.engine = engine
        self.policy = get_policy(policy) if isinstance(policy, str) else policy
        self.user = user
        self.config = config or SessionConfig()
        check_policy_settings(self.policy, self.config)
        # one updater (and so one TRL trainer per objective) can serve every method run on the engine
        self.updater = updater or LoRAUpdater(engine, update or session_update_config())
        self.critic_lm = critic_lm
        self.adapter = getattr(program, "adapter", None) or dspy.settings.adapter or dspy.ChatAdapter()
        self.answer_name, self.answer_predictor = _answer_predictor(program)
        self.base_lm = self._base_lm()
        # every conversation starts from these weights: the program's pinned ones, else those in use now
        self.start_weights = engine.pin(self.base_lm.pinned_weights) if self.base_lm.pinned_weights else engine.pin()

    def close(self) -> None:
        """Put the engine's adapter back to the session's starting weights (with ``keep_adapter``: the last
        conversation's) and release the session's hold on them (idempotent); ``with Session(...)`` does it."""
        if self.start_weights is not None:
            self.engine.use_pinned(self.start_weights)
            self.engine.unpin(self.start_weights)
            self.start_weights = None

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _on_engine(self, lm) -> bool:
        return isinstance(lm, LocalLM) and lm.engine_ref is self.engine

    def _base_lm(self) -> LocalLM:
        """The program's LM on this engine (its predictors', else DSPy's configured one, else a new one)."""
        for _, predictor in self.program.named_predictors():
            if self._on_engine(predictor.lm):
                return predictor.lm
        if self._on_engine(dspy.settings.lm):
            return dspy.settings.lm
        return self.engine.lm(cache=False, max_tokens=self.config.max_tokens, temperature=0.0)

    def begin(self, example) -> Conversation:
        """A conversation about ``example`` at the session's starting weights."""
        engine = self.engine
        weights = engine.pin(self.start_weights)
        lm = self.base_lm.copy()
        lm.model = f"{lm.model.partition('@')[0]}@{weights}"
        program = self.program.deepcopy()
        if getattr(program, "use_clarify", False):
            # the session's words step is the one clarification: the Answer module answers (and the weights step
            # trains on) exactly the statement the turn records, never a second rewrite of it
            program.use_clarify = False
        for _, predictor in program.named_predictors():
            if predictor.lm is None or self._on_engine(predictor.lm):
                predictor.lm = lm
        return Conversation(example, program, lm, weights, engine.pinned_state(weights))

    def end(self, conv: Conversation) -> float:
        """Close a conversation; returns its L2 shift. With ``keep_adapter`` the conversation's weights become
        the next one's starting point. Only pinned snapshots are read: an ending conversation never waits
        for the engine's weights lock, which a generating batch holds (waiting for it made the conversations
        of a finished batch end one batch at a time). :meth:`close` puts the engine's adapter back."""
        engine = self.engine
        shift = adapter_shift(engine, conv.start_state, engine.pinned_state(conv.weights)).total
        if self.config.keep_adapter:
            engine.unpin(self.start_weights)
            self.start_weights = engine.pin(conv.weights)
        engine.unpin(conv.weights)
        conv.lm.close()  # its own hold on the conversation's weights
        return shift

    # -- the pieces a turn is made of -------------------------------------------------------

    def answer(self, conv: Conversation, statement: str) -> tuple[Any, str]:
        """The program's answer to ``statement``: (prediction or None, the full reply text)."""
        try:
            prediction = conv.program(problem=statement)
            return prediction, str(prediction.get("reasoning") or prediction.get("answer") or "")
        except AdapterParseError as exc:
            return None, exc.lm_response or ""

    def prompt_messages(self, statement: str) -> list[dict]:
        """The chat messages the answer module sends for ``statement`` (for training rows)."""
        predictor = self.answer_predictor
        return self.adapter.format(predictor.signature, list(predictor.demos), {"problem": statement})

    def words_step(self, conv: Conversation, problem: str, history: list[dict], feedback: str,
                   revealed: list[str] | None = None):
        from rosa2_dspy.words import refine

        # the critic is the conversation's own model (its pinned weights), unless the session names one:
        # DSPy's configured LM follows whatever weights the engine holds, which other conversations change
        return refine(conv.program.clarify, problem, history, feedback, critic_lm=self.critic_lm or conv.lm,
                      adapter=self.adapter, max_tokens=self.config.words_max_tokens, revealed=revealed,
                      strict=self.config.clarify_check == "strict", mode=self.config.clarify_mode)

    def sample_desirable(self, conv: Conversation, messages: list[dict], rejected: set[str],
                         turn: int) -> tuple[list[str], list[dict]]:
        """Sample replies under the conversation's weights (queued together, so they batch with each
        other and with other conversations); keep those that pass the self-checks.
        Returns (kept, all checks)."""
        cfg = self.config
        if cfg.samples < 1:
            return [], []
        settings = GenSettings(max_tokens=cfg.max_tokens, do_sample=True, temperature=cfg.sample_temperature,
                               top_p=0.95, top_k=None, seed=None, weights=conv.weights)
        ids = self.engine.encode_chat(messages)
        uid = str(conv.example.get("unique_id", ""))
        futures = [self.engine.submit(ids, replace(settings, seed=_sample_seed(cfg.seed, uid, turn, i)))
                   for i in range(cfg.samples)]
        completions = [future.result() for future in futures]
        for completion in completions:
            count_usage(completion)
        replies = [c.text for c in completions]
        answers = [answer_key(boxed) if (boxed := last_boxed(r)) else None for r in replies]
        counts = collections.Counter(a for a in answers if a)
        majority, votes = counts.most_common(1)[0] if counts else (None, 0)
        kept, checks = [], []
        for reply, answer in zip(replies, answers):
            check = {"boxed": last_boxed(reply) is not None, "parseable": bool(answer),
                     "majority": answer is not None and answer == majority and (votes >= 2 or cfg.samples == 1),
                     "not_rejected": answer is not None and answer not in rejected}
            checks.append(check)
            if all(check.values()):
                kept.append(reply)
        return kept, checks

    def weights_step(self, conv: Conversation, messages: list[dict], rejected_replies: list[str],
                     rejected: set[str], turn: int) -> dict:
        started = time.perf_counter()
        with usage_scope() as usage:
            desirable, checks = self.sample_desirable(conv, messages, rejected, turn)
        sampling_seconds = round(time.perf_counter() - started, 3)
        rows = [kto_row(messages, reply, False) for reply in rejected_replies if reply.strip()]
        rows += [kto_row(messages, reply, True) for reply in desirable]
        info = {"desirable": len(desirable), "undesirable": len(rows) - len(desirable), "sample_checks": checks,
                "sampling_seconds": sampling_seconds, "compute_seconds": usage["compute_seconds"]}
        if not rows:
            info["skipped"] = "no training rows"
            return info
        objective = self.updater.config.objective
        if objective == "sft" and not desirable:
            info["skipped"] = "sft needs a desirable sample; none passed the self-checks"
            return info
        engine = self.engine
        with engine.updating():  # one update at a time, from this conversation's weights, ahead of generation
            engine.use_pinned(conv.weights)
            result = self.updater.update(rows, session_start=conv.start_state)
            conv.move_to(engine, engine.pin())
        info.update(result.to_dict())
        info["compute_seconds"] += result.seconds  # the update holds the machine alone
        return info

    # -- the turn loop ----------------------------------------------------------------------

    def run(self, example) -> dict:
        """One conversation about ``example``; returns its record (never raises on model errors)."""
        started = time.perf_counter()
        conv = self.begin(example)
        record = {"unique_id": example.unique_id, "subject": example.get("subject"), "level": example.get("level"),
                  "gold": example.answer, "method": self.policy.name, "turns": [], "error": None}
        # how the user posed it (a sharded user: what it withheld); a user needs only `judge`
        posed = self.user.describe(example) if hasattr(self.user, "describe") else None
        if posed is not None:
            record["posed"] = posed
            record["semantic_gap"] = bool(posed.get("semantic_gap"))
        try:
            record.update(self._converse(conv, record["turns"]))  # the turns so far stay if it fails
        except Exception as exc:  # noqa: BLE001 - one problem's failure is recorded; the run goes on
            record.update(error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(limit=5),
                          solved=False, turns_used=len(record["turns"]))
        finally:
            record["l2_shift"] = round(self.end(conv), 6)
        turns = record["turns"]
        record["seconds"] = round(time.perf_counter() - started, 3)
        record["seconds_split"] = {k: round(sum(t["seconds"][k] for t in turns), 3) for k in STEPS}
        record["boxed_rate"] = sum(t["boxed"] for t in turns) / len(turns) if turns else 0.0
        return record

    def _converse(self, conv: Conversation, turns: list[dict]) -> dict:
        """The turn loop: answer, judge; after a failed turn the policy's words and weights steps; again."""
        cfg, policy, example = self.config, self.policy, conv.example
        budget = 1 if policy.single_turn else cfg.turns
        # the user's first message: the problem, or a sharded user's first turn (the `whole` method: the problem)
        opening = getattr(self.user, "opening", None)
        problem = statement = example.problem if policy.whole_problem or opening is None else opening(example)
        revealed: list[str] = []  # pieces of the problem the user told after turn 1
        history: list[dict] = []
        rejected_answers: set[str] = set()
        rejected_replies: list[str] = []
        for turn in range(1, budget + 1):
            entry = _turn_entry(turn, statement)
            turns.append(entry)
            with _timed(entry, "generation") as usage:  # no tokens: answered by DSPy's cache or a joined request
                prediction, reply = self.answer(conv, statement)
            verdict = self.user.judge(example, prediction, turn)
            answer = getattr(prediction, "answer", None) if prediction is not None else None
            entry.update(reply=reply, answer=answer, boxed=verdict.boxed, correct=verdict.correct,
                         accepted=verdict.accepted, feedback=verdict.feedback, generated_tokens=usage["output_tokens"])
            shown = getattr(verdict, "revealed", None)  # a user needs only accepted/feedback/correct/boxed
            if shown:
                entry["revealed"] = shown
            if getattr(verdict, "grade_fallback", False):
                entry["grade_fallback"] = True
            if verdict.accepted:
                return {"solved": True, "turns_used": turn}
            if turn == budget:
                break
            if answer_key(answer):
                rejected_answers.add(answer_key(answer))
            rejected_replies.append(reply)
            if shown:
                revealed.append(shown)
            history.append({"answer": answer or "(no boxed answer)", "feedback": verdict.feedback})
            answered = statement  # the prompt this turn's answer was given
            rewritten = any(t["words"] for t in turns)  # a words step ran after an earlier turn
            do_words, do_weights = policy.steps(turn, budget)
            if cfg.words_after == "first" and rewritten:
                do_words = False  # the words were rewritten once; later turns keep them
            if do_words:  # 3. words step
                with _timed(entry, "words"):
                    refinement = self.words_step(conv, problem, history, verdict.feedback, revealed)
                statement = refinement.clarified_problem
                entry["words"] = refinement.to_dict()
            elif policy.words == "never":  # weights only, or retry: the raw feedback goes into the prompt
                statement = as_told(problem, history)
            elif rewritten:  # the words of an earlier step, brought up to date
                statement = kept_words(statement, problem, history, shown, cfg.clarify_mode)
            if do_weights:  # 4. weights step, conditioned on the (refined) prompt, or on the one just answered
                trained_on = statement if policy.weights_on == "next" else answered
                with _timed(entry, "weights"):
                    entry["weights"] = self.weights_step(conv, self.prompt_messages(trained_on), rejected_replies,
                                                         rejected_answers, turn)
                entry["weights"]["trained_on"] = trained_on
                # sampling's share of batches plus the whole update, which holds the machine alone
                entry["compute_seconds"]["weights"] = round(entry["weights"].get("compute_seconds", 0.0), 3)
        return {"solved": False, "turns_used": budget}


STEPS = ("generation", "words", "weights")


def _turn_entry(turn: int, statement: str) -> dict:
    """A turn's record before it runs: the prompt it answers; no reply, verdict or steps yet; zero seconds."""
    return {"turn": turn, "statement": statement, "reply": None, "answer": None, "boxed": False, "correct": False,
            "accepted": False, "feedback": None, "words": None, "weights": None, "generated_tokens": 0,
            "seconds": dict.fromkeys(STEPS, 0.0), "compute_seconds": dict.fromkeys(STEPS, 0.0)}


@contextlib.contextmanager
def _timed(entry: dict, step: str):
    """Time one step of a turn into its entry: wall seconds (waits for other conversations included) and
    machine seconds (this conversation's share of the engine's batches). Yields the step's token usage."""
    started = time.perf_counter()
    with usage_scope() as usage:
        yield usage
    entry["seconds"][step] = round(time.perf_counter() - started, 3)
    entry["compute_seconds"][step] = round(usage["compute_seconds"], 3)
