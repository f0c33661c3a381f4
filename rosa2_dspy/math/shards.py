"""Sharded MATH problems: a question posed with some of its conditions withheld, revealed turn by turn.

After "LLMs Get Lost in Multi-Turn Conversation" (arXiv 2505.06120): an instruction split into shards
that the user reveals one turn at a time. :func:`split_problem` cuts a problem into pieces (sentences,
and the ``If ..., then``/``..., assuming ...`` clauses of a one-sentence problem) without cutting
through ``$...$``, ``$$...$$``, ``\\(...\\)``, ``\\[...\\]``, LaTeX environments or ``[asy]`` figures;
one piece is the question, the others are condition shards (a ``form`` shard says what form the
answer takes). :func:`shard` picks, deterministically from the seed and the problem id, one or two
shards to withhold: only ones that carry a number, a condition (a math expression) or the answer
form, and never one that states the gold answer. A problem with nothing to withhold is posed whole
and has no semantic gap.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field

from rosa2_dspy.math.grading import strict_normalize

# spans a sentence boundary never falls inside; a figure is kept with the sentence it follows
_PROTECTED = re.compile(
    r"\[asy\].*?\[/asy\]"
    r"|\$\$.*?\$\$"
    r"|\\\[.*?\\\]"
    r"|\\\(.*?\\\)"
    r"|\\begin\{(?P<env>[a-zA-Z*]+)\}.*?\\end\{(?P=env)\}"
    r"|(?<!\\)\$(?:\\.|[^$\\])*\$",  # inline math; \$ inside it is a dollar sign
    re.DOTALL)
_ABBREVIATIONS = {"e.g", "i.e", "mr", "mrs", "ms", "dr", "st", "vs", "etc", "a.m", "p.m", "no", "approx", "ft", "in"}
_QUESTION_START = re.compile(
    r"^(what|how|which|who|whom|whose|when|where|why|is|are|does|do|can|find|compute|determine|evaluate|"
    r"simplify|solve|calculate|give|express|factor|expand|rationalize|convert|list|enter|write|round)\b",
    re.IGNORECASE)
_FORM = re.compile(
    r"^(express|enter|give|write|round)\b.*\b(answer|answers|result)\b"
    r"|\b(as a (common|mixed|decimal)|in simplest (radical )?form|to the nearest|in terms of \$?\\?pi|"
    r"separated by commas|in interval notation)\b",
    re.IGNORECASE)
_FORM_START = re.compile(r"^(express|enter|give|write|round)\b", re.IGNORECASE)  # after the question: its form
# clause cuts inside one sentence: a leading condition ("If A, what is B?") or a trailing one
_LEADING_CUT = re.compile(
    r"\s+(?:then\s+)?(?=(what|how|which|find|compute|determine|evaluate|simplify|express|solve|calculate|is|are)\b)",
    re.IGNORECASE)
_TRAILING_CUT = re.compile(r",\s+(?=(assuming|given that|provided that)\b)", re.IGNORECASE)


@dataclass(frozen=True)
class Piece:
    text: str
    kind: str  # question | condition | form
    separator: str = " "  # what stood before it in the problem ("" first, "\n\n" for a new paragraph)

    @property
    def carries(self) -> bool:
        """Worth withholding: a number, a math expression (a condition) or the answer's form."""
        return self.kind == "form" or _carries(self.text)


@dataclass(frozen=True)
class ShardedProblem:
    problem: str
    pieces: tuple[Piece, ...]
    withheld: tuple[int, ...] = ()  # indices into pieces, in the order the user reveals them
    reasons: tuple[str, ...] = field(default=())  # why nothing is withheld, when nothing is

    @property
    def semantic_gap(self) -> bool:
        return bool(self.withheld)

    @property
    def opening(self) -> str:
        """The first turn: the problem without the withheld shards (the whole problem when none)."""
        if not self.withheld:
            return self.problem
        kept = [p for i, p in enumerate(self.pieces) if i not in self.withheld]
        text = "".join((p.separator if j else "") + p.text for j, p in enumerate(kept))
        return text.strip()

    @property
    def shards(self) -> list[str]:
        """The withheld shards as the user would say them, in the order they are revealed."""
        return [as_message(self.pieces[i].text) for i in self.withheld]

    def to_dict(self) -> dict:
        return {"semantic_gap": self.semantic_gap, "opening": self.opening, "withheld": self.shards,
                "pieces": len(self.pieces), "no_gap_reason": "; ".join(self.reasons) or None}


def _carries(text: str) -> bool:
    """A number or a math expression (masked text: a protected span counts)."""
    return bool(re.search(r"\d|\$|\\\[|\\\(|[\ue000-\uf8ff]", text))


_BASE = 0xE000  # a protected span stands in the masked text as one private-use character, chr(_BASE + its index)


def _placeholder(index: int) -> str:
    return chr(_BASE + index)


def _span(ch: str, spans: list[str]) -> str | None:
    """The protected span a masked character stands for, or None for an ordinary character."""
    return spans[ord(ch) - _BASE] if ch and "\ue000" <= ch <= "\uf8ff" else None


def _mask(text: str) -> tuple[str, list[str]]:
    """``text`` with each protected span replaced by a private-use character, and the spans."""
    spans: list[str] = []

    def keep(match: re.Match) -> str:
        spans.append(match.group(0))
        return _placeholder(len(spans) - 1)

    return _PROTECTED.sub(keep, text), spans


def _unmask(text: str, spans: list[str]) -> str:
    return re.sub("[\ue000-\uf8ff]", lambda m: _span(m.group(0), spans), text)


def _span_ends_with(span: str, chars: str) -> bool:
    inner = span.rstrip("$").removesuffix("\\]").removesuffix("\\)").rstrip()
    return inner.endswith(tuple(chars))


def _ends_sentence(span: str) -> bool:
    """A math span that closes its sentence: ``$1.$ In ...`` or ``\\[ ... .\\]Find ...``."""
    return _span_ends_with(span, ".?")  # "$97!$" is a factorial, not an exclamation


def _sentences(masked: str, spans: list[str]) -> list[tuple[str, str]]:
    """(separator, sentence) pairs of the masked text."""
    out, start, separator = [], 0, ""
    i = 0
    while i < len(masked):
        ch = masked[i]
        boundary = None
        if ch in ".?!" and (i + 1 == len(masked) or masked[i + 1].isspace()) and \
                not masked[i + 1:].lstrip()[:1].islower():
            word = re.search(r"([A-Za-z.]+)$", masked[start:i])
            # not after an abbreviation, an initial or a choice label ("A. 10")
            if not (ch == "." and word and (word.group(1).lower() in _ABBREVIATIONS or len(word.group(1)) == 1)):
                boundary = i + 1
        elif (span := _span(ch, spans)) is not None and _ends_sentence(span):
            rest = masked[i + 1:]
            if not rest or rest[0].isspace() or rest[0].isupper():
                boundary = i + 1
        elif ch == "\n" and masked[i:i + 2] == "\n\n":
            boundary = i
        if boundary is not None:
            piece = masked[start:boundary].strip()
            if piece:
                out.append((separator, piece))
            gap = re.match(r"\s*", masked[boundary:]).group(0)
            separator = "\n\n" if "\n\n" in gap else " "
            start = i = boundary + len(gap)
            continue
        i += 1
    tail = masked[start:].strip()
    if tail:
        out.append((separator, tail))
    return out


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:] if text[:1].isalpha() else text


def _clauses(sentence: str, spans: list[str]) -> list[tuple[str, str]]:
    """A one-sentence problem's (kind, clause) parts: a leading or trailing condition, then the question.
    ``sentence`` is masked; a comma that ends a math span (``$x = 1,$ then ...``) counts as a cut."""
    for lead in _LEADING_CUT.finditer(sentence):
        before = sentence[:lead.start()]
        last = before[-1:]
        if not _carries(before):  # "In cents, what is ...": nothing worth a shard of its own
            continue
        if last == ",":
            return [("condition", before[:-1] + "."), ("question", _capitalize(sentence[lead.end():]))]
        span = _span(last, spans)
        if span is not None and _span_ends_with(span, ","):
            cut = span.rindex(",")
            spans.append(span[:cut] + "." + span[cut + 1:])  # the math's own comma becomes the full stop
            return [("condition", before[:-1] + _placeholder(len(spans) - 1)),
                    ("question", _capitalize(sentence[lead.end():]))]
    trail = _TRAILING_CUT.search(sentence)
    if trail and _carries(sentence[trail.end():]):
        question, condition = sentence[:trail.start()], sentence[trail.end():]
        end = sentence.rstrip()[-1:] if sentence.rstrip()[-1:] in "?." else "."
        return [("question", question + end), ("condition", _capitalize(condition.rstrip("?.")) + ".")]
    return [("question", sentence)]


def _is_figure(masked: str, spans: list[str]) -> bool:
    return len(masked) == 1 and (_span(masked, spans) or "").startswith("[asy]")


def split_problem(problem: str) -> list[Piece]:
    """The problem's pieces in order; exactly one has kind ``question``."""
    masked, spans = _mask(problem)
    sentences: list[tuple[str, str]] = []
    for separator, sentence in _sentences(masked, spans):
        if sentences and _is_figure(sentence, spans):  # a figure belongs to the sentence before it
            sentences[-1] = (sentences[-1][0], sentences[-1][1] + separator + sentence)
        else:
            sentences.append((separator, sentence))
    if not sentences:
        return [Piece(problem.strip(), "question", "")]
    plain = [_unmask(s, spans) for _, s in sentences]
    kinds = ["form" if _FORM.search(text) else "condition" for text in plain]
    asking = [i for i, text in enumerate(plain) if kinds[i] != "form" and "?" in text]
    asking = asking or [i for i, (_, s) in enumerate(sentences) if kinds[i] != "form" and _QUESTION_START.match(s)]
    question = (asking or [i for i, k in enumerate(kinds) if k != "form"] or [len(sentences) - 1])[-1]
    pieces: list[Piece] = []
    for i, (separator, sentence) in enumerate(sentences):
        if i != question:
            kind = "form" if i > question and _FORM_START.match(sentence) else kinds[i]
            pieces.append(Piece(plain[i], kind, separator if pieces else ""))
            continue
        parts = _clauses(sentence, spans)
        for j, (kind, text) in enumerate(parts):
            pieces.append(Piece(_unmask(text, spans).strip(), kind, (separator if j == 0 else " ") if pieces else ""))
    return pieces


def as_message(text: str) -> str:
    """A shard as something the user says: a trailing comma or the math's closing period made plain."""
    text = text.strip()
    text = re.sub(r",(\$)$", r"\1", text)
    return text if text.endswith((".", "?", "!", "$", "]", ")")) else text + "."


def _math_segments(text: str) -> list[str]:
    return [m.strip("$").strip() for m in re.findall(r"(?<!\\)\$(?:\\.|[^$\\])*\$", text)]


def states_answer(text: str, gold: str | None) -> bool:
    """Whether ``text`` gives the gold answer away: a boxed answer, "the answer is", or a math segment
    (or a bare word) equal to the gold answer."""
    if "\\boxed" in text or re.search(r"\banswer is\b", text, re.IGNORECASE):
        return True
    if not gold:
        return False
    target = strict_normalize(gold)
    if not target:
        return False
    segments = [strict_normalize(s.rstrip(".,")) for s in _math_segments(text)]
    words = [strict_normalize(w) for w in re.findall(r"[A-Za-z0-9.\\{}^]+", text)]
    return target in segments or (not target.replace(".", "").isdigit() and target in words)


def seeded_random(key: str) -> random.Random:
    """A generator drawn from ``key`` alone (sha256, so it is the same in every process and run)."""
    return random.Random(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big"))


def shard(problem: str, *, gold: str | None = None, seed: int = 0, unique_id: str = "") -> ShardedProblem:
    """Pick the shards to withhold (one, or two when there are three or more to choose from)."""
    pieces = tuple(split_problem(problem))
    conditions = [i for i, p in enumerate(pieces) if p.kind != "question"]
    if not conditions:
        return ShardedProblem(problem, pieces, (), ("the problem is a single question",))
    candidates = [i for i in conditions if pieces[i].carries and not states_answer(pieces[i].text, gold)]
    if not candidates:
        return ShardedProblem(problem, pieces, (), ("no shard carries a number, a condition or the answer form "
                                                    "without stating the answer",))
    rng = seeded_random(f"shards:{seed}:{unique_id}")
    count = 2 if len(candidates) >= 3 else 1
    withheld = tuple(sorted(rng.sample(candidates, count)))  # revealed in the order the problem has them
    return ShardedProblem(problem, pieces, withheld)


def shard_example(example, seed: int = 0) -> ShardedProblem:
    return shard(example.problem, gold=example.get("answer"), seed=seed, unique_id=str(example.get("unique_id", "")))


def gap_counts(examples, seed: int = 0) -> dict:
    """How many problems get a semantic gap, overall, per level and per subject."""
    total = {"problems": 0, "semantic_gap": 0}
    by: dict[str, dict[str, dict]] = {"level": {}, "subject": {}}
    withheld = 0
    for example in examples:
        sharded = shard_example(example, seed)
        total["problems"] += 1
        total["semantic_gap"] += sharded.semantic_gap
        withheld += len(sharded.withheld)
        for key in by:
            group = by[key].setdefault(str(example.get(key)), {"problems": 0, "semantic_gap": 0})
            group["problems"] += 1
            group["semantic_gap"] += sharded.semantic_gap
    total["gap_rate"] = round(total["semantic_gap"] / total["problems"], 4) if total["problems"] else 0.0
    total["mean_withheld_when_gap"] = round(withheld / total["semantic_gap"], 3) if total["semantic_gap"] else 0.0
    return {**total, **{f"by_{key}": dict(sorted(groups.items())) for key, groups in by.items()}}
