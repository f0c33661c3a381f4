"""The comparison report: per-method table (report.md), cumulative accuracy by turn with interval bands (PNG),
and report.html: one self-contained page with the tables, the plot and every conversation, filterable."""

from __future__ import annotations

import base64
import html
import math
import statistics
from pathlib import Path

from rosa2_dspy.evaluation import ResultsFile, wilson_interval
from rosa2_dspy.fsutil import staged_file, write_json_atomic, write_text_atomic
from rosa2_dspy.math.grading import answer_key
from rosa2_dspy.provenance import describe_segments, read_segments


def summarize_sessions(records: list[dict], turns: int) -> dict:
    n = len(records)
    solved = sum(1 for r in records if r.get("solved"))
    low, high = wilson_interval(solved, n) if n else (0.0, 0.0)
    all_turns = [t for r in records for t in r.get("turns", [])]
    split = {key: sum(r.get("seconds_split", {}).get(key, 0.0) for r in records)
             for key in ("generation", "words", "weights")}
    adapted_turns = sum(1 for t in all_turns if t.get("words") or t.get("weights"))
    adapt = split["words"] + split["weights"]
    # a turn's generation cost, from the turns that generated (not those DSPy's cache answered)
    generated = [t for t in all_turns if t.get("generated_tokens", 1) and "seconds" in t]
    generation_per_turn = (sum(t["seconds"]["generation"] for t in generated) / len(generated) if generated
                           else split["generation"] / len(all_turns) if all_turns else 0.0)
    # the same in machine time (each batch's time shared among its rows; an update counts whole), free of
    # the waits for other conversations that wall time includes; the weights step is sampling plus the update
    machine = [t["compute_seconds"] for t in generated if "compute_seconds" in t]
    steps = [t for t in all_turns if "compute_seconds" in t and (t.get("words") or t.get("weights"))]
    update = [(t.get("weights") or {}).get("seconds", 0.0) for t in steps]
    machine_split = machine_ratio = None
    if machine and steps:
        machine_split = {
            "generation": sum(m["generation"] for m in machine) / len(machine),
            "words": sum(t["compute_seconds"]["words"] for t in steps) / len(steps),
            "sampling": max(0.0, sum(t["compute_seconds"]["weights"] - u for t, u in zip(steps, update)) / len(steps)),
            "update": sum(update) / len(steps)}
        if machine_split["generation"] > 0:
            machine_ratio = (machine_split["words"] + machine_split["sampling"] + machine_split["update"]) / \
                machine_split["generation"]
    solved_by = [sum(1 for r in records if r.get("solved") and r.get("turns_used", 0) <= k)
                 for k in range(1, turns + 1)]
    by_turn = [k / n if n else 0.0 for k in solved_by]
    words_steps = [t["words"] for t in all_turns if t.get("words")]
    fallbacks = sum(1 for w in words_steps if w.get("fallback"))
    weights_steps = [t["weights"] for t in all_turns if t.get("weights")]
    shifts = [r.get("l2_shift", 0.0) for r in records]
    return {
        "words_steps": len(words_steps), "words_fallbacks": fallbacks,
        "words_fallback_rate": fallbacks / len(words_steps) if words_steps else None,
        # the weights step's candidate replies, and how many passed the self-checks into desirable rows
        "weights_steps": len(weights_steps),
        "samples_drawn": sum(len(w.get("sample_checks") or []) for w in weights_steps),
        "samples_kept": sum(w.get("desirable", 0) for w in weights_steps),
        "problems": n, "solved": solved, "accuracy": solved / n if n else 0.0, "accuracy_ci95": [low, high],
        "mean_turns": sum(r["turns_used"] if r.get("solved") else turns for r in records) / n if n else 0.0,
        "mean_turns_to_success": (sum(r["turns_used"] for r in records if r.get("solved")) / solved
                                  if solved else None),
        "mean_l2_shift": sum(shifts) / n if n else 0.0,
        "median_l2_shift": statistics.median(shifts) if shifts else 0.0,
        "boxed_rate": sum(1 for t in all_turns if t.get("boxed")) / len(all_turns) if all_turns else 0.0,
        "seconds_per_problem": sum(r.get("seconds", 0.0) for r in records) / n if n else 0.0,
        "seconds_split_per_problem": {k: v / n for k, v in split.items()} if n else split,
        "adaptation_over_generation_per_turn": (
            (adapt / adapted_turns) / generation_per_turn if adapted_turns and generation_per_turn else None),
        "adaptation_over_generation_per_turn_machine": machine_ratio,
        "machine_seconds_per_turn": machine_split,
        "errors": sum(1 for r in records if r.get("error")),
        "grade_fallbacks": sum(1 for t in all_turns if t.get("grade_fallback")),
        "cumulative_accuracy_by_turn": by_turn,
        "cumulative_accuracy_by_turn_ci95": [list(wilson_interval(k, n)) if n else [0.0, 0.0] for k in solved_by],
    }


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for ``b`` and ``c`` discordant pairs (a binomial test at 1/2)."""
    n = b + c
    if not n:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_difference(a: list[dict], b: list[dict], resamples: int = 10000, seed: int = 0,
                      turns: int | None = None) -> dict:
    """Method A's accuracy minus method B's on the problems both ran (paired by ``unique_id``): the
    difference, a 95% paired-bootstrap interval, the discordant counts and McNemar's exact p-value. With
    ``turns`` (the budget T), also the turns A used minus B's (an unsolved problem counts T), the same
    bootstrap resamples giving its interval."""
    import numpy as np

    by_id = {r["unique_id"]: r for r in b}
    # in the problems' order, not the records': a report rebuilt from a folder (records in the order they finished)
    # draws the same resamples as the one written at the end of the run
    pairs = sorted(((r, by_id[r["unique_id"]]) for r in a if r["unique_id"] in by_id), key=lambda p: p[0]["unique_id"])
    n = len(pairs)
    if not n:
        return {"problems": 0}
    diffs = np.array([int(bool(x.get("solved"))) - int(bool(y.get("solved"))) for x, y in pairs], dtype=float)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n, size=(resamples, n))
    low, high = np.percentile(diffs[picks].mean(axis=1), [2.5, 97.5])
    a_only, b_only = int((diffs > 0).sum()), int((diffs < 0).sum())
    p = mcnemar_exact(a_only, b_only)
    out = {"problems": n, "difference": float(diffs.mean()), "ci95": [float(low), float(high)],
           "a_only": a_only, "b_only": b_only, "mcnemar_p": float(p)}
    if turns is not None:
        used = lambda r: r["turns_used"] if r.get("solved") else turns  # noqa: E731
        turn_diffs = np.array([used(x) - used(y) for x, y in pairs], dtype=float)
        t_low, t_high = np.percentile(turn_diffs[picks].mean(axis=1), [2.5, 97.5])
        out.update(turns_difference=float(turn_diffs.mean()), turns_ci95=[float(t_low), float(t_high)])
    return out


CONTROL = "retry"  # multi-turn without adaptation (rosa2_dspy.coadapt.POLICIES)


def next_turns(records: list[dict], control: list[dict], side, labels: tuple[str, ...]) -> dict:
    """What happened at the turn after each failed turn, against the control's conversation about the same problem
    (``retry``: the user's own words, no adaptation). For each failed turn k that both conversations went on from
    (both failed turn k), grouped by ``side(turn, k)`` (one of ``labels``; None: not counted): steps, how often the
    next answer differed from the failed one (compared as the strict grader normalises them; no answer twice counts
    as the same) and how often it was correct, in each conversation. A conversation that ended in an error counts
    for none of its turns."""
    by_id = {r["unique_id"]: r for r in control}
    out = {label: dict.fromkeys(("steps", "changed", "correct", "control_changed", "control_correct"), 0)
           for label in labels}
    changed = lambda a, b: answer_key(a.get("answer")) != answer_key(b.get("answer"))  # noqa: E731
    for record in records:
        other = by_id.get(record["unique_id"])
        if other is None or record.get("error") or other.get("error"):
            continue
        ours, theirs = record.get("turns") or [], other.get("turns") or []
        for k, turn in enumerate(ours[:-1]):
            d = out.get(side(turn, k))
            if d is None or k + 1 >= len(theirs):
                continue  # not counted here, or the control ended (solved, or out of turns) at this turn
            d["steps"] += 1
            d["changed"] += changed(ours[k + 1], turn)
            d["correct"] += bool(ours[k + 1].get("correct"))
            d["control_changed"] += changed(theirs[k + 1], theirs[k])
            d["control_correct"] += bool(theirs[k + 1].get("correct"))
    return out


def words_next_turn(records: list[dict], control: list[dict]) -> dict:
    """What a method's words step did to the next answer (``next_turns``), split by whether the rewrite was kept or
    fell back to the user's words. A kept rewrite that helps answers more next turns correctly than the control."""
    return next_turns(records, control, labels=("kept", "fallback"),
                      side=lambda turn, k: None if not turn.get("words") else
                      "fallback" if turn["words"].get("fallback") else "kept")


def turn_by_turn(records: list[dict], control: list[dict], turns: int) -> dict:
    """The turn after each failed turn, by turn (``next_turns``): whether a method's adaptation at that point of the
    conversation changes the answer, and to a correct one, more often than a retry does."""
    return next_turns(records, control, labels=tuple(f"turn {k}" for k in range(1, turns)),
                      side=lambda turn, k: f"turn {k + 1}")


def _next_turn_table(rows: dict[str, dict], step: str) -> list[str]:
    """A markdown table of ``next_turns``' counts, one row per method and group with steps."""
    pct = lambda n, d: f"{n} ({n / d:.0%})"  # noqa: E731
    lines = [f"| method | {step} | steps | next answer new | next correct | `{CONTROL}` new | `{CONTROL}` correct |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for method, groups in rows.items():
        for group, d in groups.items():
            if d["steps"]:
                lines.append(f"| {method} | {group} | {d['steps']} | {pct(d['changed'], d['steps'])} "
                             f"| {pct(d['correct'], d['steps'])} | {pct(d['control_changed'], d['steps'])} "
                             f"| {pct(d['control_correct'], d['steps'])} |")
    return lines


def _adapted(records: list[dict]) -> bool:
    """Whether a method's conversations took a words or a weights step after some failed turn (what its records
    say: this module sits below the policies)."""
    return any(turn.get("words") or turn.get("weights") for r in records for turn in r.get("turns") or [])


def build_report(out: str | Path, methods: list[str], turns: int, title: str = "rosa2 bench compare",
                 reference: str | None = None, ids: list[str] | None = None,
                 notes: list[str] | None = None) -> Path:
    """Read ``out/<method>/results.jsonl`` for each method; write summary.json, report.md, accuracy_by_turn.png.
    ``ids``: report only these problems. ``reference``'s accuracy (default ``rosa2``, else its first variant's, else
    the first method's) is compared, paired, with each other method's, and each adapting method's with ``retry``'s
    (the control: the same further turns without adaptation) when it ran; records that say whether the problem had
    a semantic gap (a sharded user) are also summarised per side."""
    out = Path(out)
    records, summaries = {}, {}
    for method in methods:
        path = out / method / "results.jsonl"
        if not path.exists():
            continue
        found = ResultsFile(path, repair=False).records
        # the problems asked for, in their order; a folder may hold more (an earlier, larger --limit)
        records[method] = list(found.values()) if ids is None else [found[i] for i in ids if i in found]
        summaries[method] = summarize_sessions(records[method], turns)
    if not summaries:
        raise ValueError(f"no results under {out}: run the methods first")
    # rosa2 against each baseline; without rosa2, its first variant; without either, the first method (say `whole`
    # against `single`)
    reference = reference or ("rosa2" if "rosa2" in records else
                              next((m for m in records if m.startswith("rosa2@")), next(iter(records))))
    pairs = [(reference, m) for m in records if reference in records and m != reference]
    if CONTROL in records:  # how much each adaptation adds to the further turns alone
        pairs += [(m, CONTROL) for m in records if m not in (reference, CONTROL) and _adapted(records[m])]
    paired = {f"{a} - {b}": paired_difference(records[a], records[b], turns=turns) for a, b in pairs}
    next_turn = {m: words_next_turn(records[m], records[CONTROL]) for m in records
                  if CONTROL in records and m != CONTROL and any(t.get("words") for r in records[m]
                                                                 for t in r.get("turns") or [])}
    by_turn = {m: turn_by_turn(records[m], records[CONTROL], turns) for m in records
               if CONTROL in records and any(len(r.get("turns") or []) > 1 for r in records[m])}
    by_gap = {}
    if any("semantic_gap" in r for rs in records.values() for r in rs):
        for method, rs in records.items():
            by_gap[method] = {side: summarize_sessions([r for r in rs if bool(r.get("semantic_gap")) == flag], turns)
                              for side, flag in (("gap", True), ("no_gap", False))}
    write_json_atomic(out / "summary.json", {"turns": turns, "methods": summaries, "paired": paired,
                                             "by_semantic_gap": by_gap or None,
                                             "words_next_turn": next_turn or None,
                                             "next_turn_by_turn": by_turn or None})
    _plot(out / "accuracy_by_turn.png", summaries, turns, title)
    ran = describe_segments(read_segments(out))  # (its own paragraph)
    notes = [*(notes or []), *([""] if notes and ran else []), *([ran] if ran else [])]
    lines = [f"# {title}", "", f"Turn budget T = {turns}. Unsolved problems count as T turns. "
             "95% Wilson intervals. Seconds split per problem: generation / words step / weights step.",
             *(["", *notes] if notes else []), "",
             "| method | problems | accuracy (95% CI) | solved by turn 1..T | mean turns (to success) "
             "| L2 shift mean / median | boxed rate | s/problem | gen / words / weights s "
             "| adapt÷gen per turn (wall / machine) | errors |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for method, s in summaries.items():
        low, high = s["accuracy_ci95"]
        split = s["seconds_split_per_problem"]
        ratio = s["adaptation_over_generation_per_turn"]
        machine = s.get("adaptation_over_generation_per_turn_machine")
        ratios = "-" if ratio is None else f"{ratio:.2f} / {'-' if machine is None else f'{machine:.2f}'}"
        lines.append(
            f"| {method} | {s['problems']} | {s['accuracy']:.1%} ({low:.0%}-{high:.0%}) "
            f"| {' / '.join(f'{v:.0%}' for v in s['cumulative_accuracy_by_turn'])} | {s['mean_turns']:.2f} "
            f"({'-' if s['mean_turns_to_success'] is None else format(s['mean_turns_to_success'], '.2f')}) "
            f"| {s['mean_l2_shift']:.4f} / {s['median_l2_shift']:.4f} | {s['boxed_rate']:.1%} "
            f"| {s['seconds_per_problem']:.1f} "
            f"| {split['generation']:.1f} / {split['words']:.1f} / {split['weights']:.1f} "
            f"| {ratios} | {s['errors']} |")
    lines += ["", "Grades that math-verify could not judge (a timeout or a crash; the strict match decided): " +
              ", ".join(f"{m} {s['grade_fallbacks']}" for m, s in summaries.items()) + "."]
    split_rows = [(m, s["machine_seconds_per_turn"]) for m, s in summaries.items() if s.get("machine_seconds_per_turn")]
    if split_rows:
        lines += ["", "Machine seconds per turn: each batch's time shared among its rows, an update counted whole. "
                  "Generation: a turn that generated; the rest: a turn that adapted (the weights step is "
                  "sampling candidates plus the update).", "",
                  "| method | generation | words step | weights: sampling | weights: update | adapt÷gen |",
                  "|---|---:|---:|---:|---:|---:|"]
        for method, m in split_rows:
            machine = summaries[method]["adaptation_over_generation_per_turn_machine"]
            ratio = "-" if machine is None else f"{machine:.2f}"
            lines.append(f"| {method} | {m['generation']:.2f} | {m['words']:.2f} | {m['sampling']:.2f} "
                         f"| {m['update']:.2f} | {ratio} |")
    if paired:
        control = f"; then each adapting method minus `{CONTROL}`, the same turns without adaptation" \
            if CONTROL in records and len(pairs) > len(records) - 1 else ""
        lines += ["", f"Paired differences, {reference} minus each method{control}, on the problems both ran: "
                  "accuracy and turns used (an unsolved problem counts T) with 95% paired-bootstrap intervals; "
                  "discordant problems (solved by one only) and McNemar's exact p-value.", "",
                  "| comparison A - B | problems | accuracy difference (95% CI) | turns difference (95% CI) | only A "
                  "solved | only B solved | McNemar p |", "|---|---:|---:|---:|---:|---:|---:|"]
        for name, d in paired.items():
            if d["problems"]:
                low, high = d["ci95"]
                t_low, t_high = d["turns_ci95"]
                lines.append(f"| {name} | {d['problems']} | {d['difference']:+.1%} ({low:+.1%} to {high:+.1%}) "
                             f"| {d['turns_difference']:+.2f} ({t_low:+.2f} to {t_high:+.2f}) "
                             f"| {d['a_only']} | {d['b_only']} | {d['mcnemar_p']:.3g} |")
    if by_gap:
        lines += ["", "By semantic gap: *gap* = the user withheld part of the problem at turn 1 and revealed it "
                  "turn by turn; *no gap* = it could not be split and was posed whole. `whole` poses the whole "
                  "problem at once (the single-turn upper bound).", "",
                  "| method | side | problems | accuracy (95% CI) | solved by turn 1..T | mean turns | mean L2 shift "
                  "| words fallback |", "|---|---|---:|---:|---:|---:|---:|---:|"]
        for method, sides in by_gap.items():
            for side, s in sides.items():
                if not s["problems"]:
                    continue
                low, high = s["accuracy_ci95"]
                rate = s["words_fallback_rate"]
                fallback = "-" if rate is None else f"{rate:.0%} of {s['words_steps']}"
                lines.append(
                    f"| {method} | {side.replace('_', ' ')} | {s['problems']} | {s['accuracy']:.1%} "
                    f"({low:.0%}-{high:.0%}) | {' / '.join(f'{v:.0%}' for v in s['cumulative_accuracy_by_turn'])} "
                    f"| {s['mean_turns']:.2f} | {s['mean_l2_shift']:.4f} "
                    f"| {fallback} |")
    if next_turn:
        lines += ["", f"The words step's next turn, against `{CONTROL}` at the same turn of the same problem (both "
                  "failed the turn before): how often the next answer was new (not the rejected one) and correct "
                  "after a rewrite the check kept, and after a fallback to the user's words.", "",
                  *_next_turn_table(next_turn, "words step")]
    if by_turn:
        lines += ["", f"Every failed turn's next turn, by turn, against `{CONTROL}` the same way (`{CONTROL}`'s own "
                  "row: itself): does a method's adaptation at that point change the rejected answer, and to a "
                  "correct one, more often than asking again does?", "", *_next_turn_table(by_turn, "failed turn")]
    sampled = [f"{m} {s['samples_kept']}/{s['samples_drawn']}" for m, s in summaries.items() if s["weights_steps"]]
    if sampled:
        lines += ["", "Weights-step samples that passed the self-checks (kept as desirable rows / drawn): " +
                  ", ".join(sampled) + "."]
    lines += ["", "![cumulative accuracy by turn](accuracy_by_turn.png)", "",
              "Every conversation, turn by turn, filterable by method and outcome: [report.html](report.html).", ""]
    report = out / "report.md"
    write_text_atomic(report, "\n".join(lines))
    write_text_atomic(out / "report.html", render_html(title, lines, records, out / "accuracy_by_turn.png"))
    return report


# ----------------------------------------------------------------------------- report.html

_CSS = """
body{font:15px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px}
th{background:#f3f3f3}td{text-align:right}td:first-child,td.l{text-align:left}
img{max-width:100%}.filters{position:sticky;top:0;background:#fff;padding:.5em 0;border-bottom:1px solid #ddd}
details.conversation{border:1px solid #ddd;border-radius:6px;margin:.5em 0;padding:.3em .8em}
details.conversation[hidden]{display:none}summary{cursor:pointer}.solved{color:#17702b}.unsolved{color:#a3261b}
.turn{border-top:1px dashed #ccc;padding:.4em 0}.side{display:grid;grid-template-columns:1fr 1fr;gap:1em}
pre{white-space:pre-wrap;word-break:break-word;background:#f8f8f8;padding:.5em;margin:.2em 0;max-height:18em;
overflow:auto;font-size:13px}.k{color:#666;font-size:13px}
"""

_SCRIPT = """
const sel = {method: document.getElementById('method'), outcome: document.getElementById('outcome')};
function apply() {
  let shown = 0;
  const all = document.querySelectorAll('details.conversation');
  all.forEach(c => {
    const ok = (sel.method.value === 'all' || c.dataset.method === sel.method.value) &&
               (sel.outcome.value === 'all' || c.dataset.outcome === sel.outcome.value);
    c.hidden = !ok; shown += ok;
  });
  document.getElementById('shown').textContent = shown + ' of ' + all.length + ' conversations';
  history.replaceState(null, '', '#method=' + sel.method.value + '&outcome=' + sel.outcome.value);
}
const wanted = new URLSearchParams(location.hash.slice(1));
for (const [key, box] of Object.entries(sel)) {
  if (wanted.has(key) && [...box.options].some(o => o.value === wanted.get(key))) box.value = wanted.get(key);
  box.addEventListener('change', apply);
}
apply();
"""

_CLIP = 6000  # characters of a reply or prompt shown (the records hold the whole text)


def _cell(text: str, *, left: bool = False) -> str:
    return f"<td{' class=l' if left else ''}>{_inline(text)}</td>"


def _inline(text: str) -> str:
    """Markdown table-cell text as HTML: escaped, with **bold** and `code` kept."""
    import re

    out = html.escape(text.strip())
    out = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", out)
    out = re.sub(r"(?<![\w*])\*([^*\s][^*]*?)\*(?![\w*])", r"<i>\1</i>", out)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", out)


def _markdown_blocks(lines: list[str]) -> str:
    """The report's markdown (headings, paragraphs, pipe tables; images are placed separately) as HTML."""
    parts, table = [], []

    def flush() -> None:
        if table:
            rows = [r for r in table if not set(r.replace("|", "").strip()) <= set("-: ")]
            head, body = rows[0], rows[1:]
            cells = lambda row: [c for c in row.strip().strip("|").split("|")]  # noqa: E731
            parts.append("<table><thead><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in cells(head)) +
                         "</tr></thead><tbody>" + "".join(
                             "<tr>" + "".join(_cell(c, left=i < 2 and not c.strip()[:1].isdigit())
                                              for i, c in enumerate(cells(row))) + "</tr>" for row in body) +
                         "</tbody></table>")
            table.clear()

    for line in lines:
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith("![") or "(report.html)" in line:  # the plot is embedded; the page is this one
            continue
        if line.startswith("# "):
            parts.append(f"<h1>{_inline(line[2:])}</h1>")
        elif line.strip():
            parts.append(f"<p>{_inline(line)}</p>")
    flush()
    return "\n".join(parts)


def _conversation(method: str, record: dict) -> str:
    turns = record.get("turns") or []
    solved = bool(record.get("solved"))
    outcome = "solved" if solved else "unsolved"
    verdict = (f"solved at turn {record.get('turns_used')}" if solved else
               f"unsolved after {len(turns)} turn{'s' * (len(turns) != 1)}")
    gap = record.get("semantic_gap")
    head = (f"<b>{html.escape(method)}</b> · {html.escape(str(record.get('unique_id')))} · "
            f"<span class={outcome}>{verdict}</span> · L2 shift {record.get('l2_shift', 0.0):.4f}"
            + (" · semantic gap" if gap else "") + (f" · error: {html.escape(record['error'])}"
                                                  if record.get("error") else ""))
    original = turns[0].get("statement") or "" if turns else ""
    body = []
    withheld = (record.get("posed") or {}).get("withheld") or []
    if withheld:
        body.append("<div class=k>withheld at turn 1, revealed one per failed turn:</div>" +
                    "".join(f"<pre>{html.escape(w)}</pre>" for w in withheld))
    for turn in turns:
        words = turn.get("words") or {}
        weights = turn.get("weights") or {}
        steps = []
        if words:
            steps.append("words step" + (f" (fallback: {html.escape(words['fallback'])})"
                                         if words.get("fallback") else ""))
        if weights:
            steps.append("weights step: " + (html.escape(weights["skipped"]) if weights.get("skipped") else
                                              f"{weights.get('undesirable', 0)} rejected, "
                                              f"{weights.get('desirable', 0)} desirable rows"))
        verdict = "accepted" if turn.get("accepted") else f"rejected: {html.escape(str(turn.get('feedback')))}"
        body.append(
            f"<div class=turn><div class=k>turn {turn.get('turn')} · answer "
            f"<code>{html.escape(str(turn.get('answer')))}</code> · "
            f"<span class={'solved' if turn.get('correct') else 'unsolved'}>{verdict}</span>"
            + (f" · then {'; '.join(steps)}" if steps else "") + "</div>"
            f"<div class=side><div><div class=k>original problem (turn 1)</div>"
            f"<pre>{html.escape(original[:_CLIP])}</pre></div>"
            f"<div><div class=k>prompt this turn answered</div>"
            f"<pre>{html.escape((turn.get('statement') or '')[:_CLIP])}</pre>"
            f"</div></div><div class=k>reply</div><pre>{html.escape(str(turn.get('reply'))[:_CLIP])}</pre></div>")
    return (f'<details class=conversation data-method="{html.escape(method)}" data-outcome="{outcome}">'
            f"<summary>{head}</summary>{''.join(body)}</details>")


def render_html(title: str, lines: list[str], records: dict[str, list[dict]], plot: Path) -> str:
    """report.html: the report's tables and plot, then each conversation (original and rewritten problem side
    by side, the reply, the verdict, the steps, the shift), filterable by method and outcome (also from the
    address: ``report.html#method=rosa2&outcome=unsolved``). One file: the plot is embedded."""
    image = ""
    if plot.exists():
        data = base64.b64encode(plot.read_bytes()).decode()
        image = f'<p><img alt="cumulative accuracy by turn" src="data:image/png;base64,{data}"></p>'
    options = "".join(f'<option value="{html.escape(m)}">{html.escape(m)}</option>' for m in records)
    conversations = "\n".join(_conversation(m, r) for m, rs in records.items() for r in rs)
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>{_markdown_blocks(lines)}{image}"
            f"<h2>Conversations</h2><div class=filters>method <select id=method><option value=all>all</option>"
            f"{options}</select> outcome <select id=outcome><option value=all>all</option>"
            f"<option value=solved>solved</option><option value=unsolved>unsolved</option></select> "
            f"<span id=shown></span></div>{conversations}<script>{_SCRIPT}</script></body></html>")


def _plot(path: Path, summaries: dict, turns: int, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    xs = list(range(1, turns + 1))
    for method, s in summaries.items():
        line, = ax.plot(xs, [100 * v for v in s["cumulative_accuracy_by_turn"]], marker="o", label=method)
        bands = s.get("cumulative_accuracy_by_turn_ci95")
        if bands:  # the 95% Wilson interval of each turn's cumulative accuracy
            ax.fill_between(xs, [100 * b[0] for b in bands], [100 * b[1] for b in bands], color=line.get_color(),
                            alpha=0.12, linewidth=0)
    ax.set_xlabel("turn")
    ax.set_ylabel("solved within turn (%), 95% band")
    ax.set_xticks(xs)
    ax.set_ylim(-2, 102)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    _save_figure(fig, path)


def _save_figure(fig, path: Path) -> None:
    """Write a matplotlib figure atomically (a staging file renamed over ``path``); close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        with staged_file(path) as staging:
            fig.savefig(staging)
    finally:
        plt.close(fig)


def build_compile_report(out: str | Path, summaries: dict[str, dict], overlap: int = 0,
                         ids: list[str] | None = None) -> Path:
    """``rosa2 bench compile``: one row per method (baseline first); each compiled method's accuracy minus the
    baseline's on the same evaluation problems (``ids``: the run's, in order), paired; the run's segments; a bar
    chart of accuracy and boxed rate."""
    out = Path(out)
    every = dict(summaries)
    wanted = set(ids) if ids is not None else None
    lines = ["# rosa2 bench compile", "",
             "Each method compiled from the base weights on the same training problems, evaluated on the same "
             f"held-out problems. 95% Wilson intervals. Evaluation problems among the training or validation "
             f"problems: {overlap}.", ""]
    segments = read_segments(out)
    if segments:
        lines += [describe_segments(segments), ""]
    lines += ["| method | problems | accuracy (95% CI) | boxed rate | parse fail | L2 shift | compile s "
              "| instructions changed |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    failed = {name: s for name, s in summaries.items() if "error" in s}
    summaries = {name: s for name, s in summaries.items() if "error" not in s}
    for name, s in summaries.items():
        low, high = s["accuracy_ci95"]
        short = f" of {len(ids)}, stopped early" if ids is not None and s["problems"] < len(ids) else ""
        lines.append(f"| {name} | {s['problems']}{short} | {s['accuracy']:.1%} ({low:.0%}-{high:.0%}) "
                     f"| {s['boxed_rate']:.1%} | {s['parse_failure_rate']:.1%} | {s.get('adapter_l2_shift') or 0:.4f} "
                     f"| {s.get('compile_seconds') or '-'} | {', '.join(s.get('instructions_changed') or []) or '-'} |")
    lines += [f"| {name} | - | compile failed: {s['error']} | | | | | |" for name, s in failed.items()]

    def graded(name: str) -> list[dict]:  # one pass's records as paired_difference reads them: solved = correct
        records = ResultsFile(out / name / "results.jsonl", repair=False).records.values()
        return [{"unique_id": r["unique_id"], "solved": bool(r.get("correct"))} for r in records
                if wanted is None or r["unique_id"] in wanted]

    paired = {}
    if "baseline" in summaries:
        base = graded("baseline")
        paired = {f"{name} - baseline": paired_difference(graded(name), base)
                  for name in summaries if name != "baseline"}
    if paired:
        lines += ["", "Each compiled method minus the uncompiled baseline on the problems both ran: accuracy "
                  "difference with a 95% paired-bootstrap interval, discordant problems (solved by one only) and "
                  "McNemar's exact p-value.", "",
                  "| comparison A - B | problems | accuracy difference (95% CI) | only A solved | only B solved "
                  "| McNemar p |", "|---|---:|---:|---:|---:|---:|"]
        for label, d in paired.items():
            if not d["problems"]:
                lines.append(f"| {label} | 0 | - | - | - | - |")
                continue
            low, high = d["ci95"]
            lines.append(f"| {label} | {d['problems']} | {d['difference']:+.1%} ({low:+.1%} to {high:+.1%}) "
                         f"| {d['a_only']} | {d['b_only']} | {d['mcnemar_p']:.3g} |")
    write_json_atomic(out / "summary.json", {"methods": every, "paired": paired})
    lines += ["", "![accuracy and boxed rate](compile_methods.png)", ""]
    _bar_plot(out / "compile_methods.png", summaries)
    report = out / "report.md"
    write_text_atomic(report, "\n".join(lines))
    return report


def _bar_plot(path: Path, summaries: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summaries)
    xs = range(len(names))
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(names)), 4), dpi=120)
    ax.bar([x - 0.2 for x in xs], [100 * summaries[n]["accuracy"] for n in names], width=0.4, label="accuracy")
    ax.bar([x + 0.2 for x in xs], [100 * summaries[n]["boxed_rate"] for n in names], width=0.4, label="boxed rate")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names, rotation=20)
    ax.set_ylabel("%")
    ax.set_title("compile-time methods on held-out problems")
    ax.legend()
    _save_figure(fig, path)
