"""report.md / summary.json / report.html of a comparison, from records shaped as Session.run writes them;
report.html is also rendered in a real headless browser (Chromium), filters and all."""

import base64
import json
import os
import re
import shutil
import subprocess

import pytest

from rosa2_dspy.evaluation import ResultsFile
from rosa2_dspy.report import build_report

OPENING = "What is the value of $x$ in the equation?"
WITHHELD = "Oh, I should have said: the equation is $2x + 3 = 11$."
REWRITE = "Solve $2x + 3 = 11$ for $x$."


def _turn(n, statement, answer, correct, *, words=False, weights=False):
    return {"turn": n, "statement": statement, "reply": f"... so the answer is \\boxed{{{answer}}} <b>",
            "answer": f"\\boxed{{{answer}}}", "boxed": True, "correct": correct, "accepted": correct,
            "feedback": None if correct else "That's not it.",
            "words": {"clarified_problem": REWRITE, "critique": "state the equation", "fallback": None} if words else None,
            "weights": {"desirable": 1, "undesirable": 1, "sample_checks": [{"boxed": True}, {"boxed": False}],
                        "seconds": 2.0, "compute_seconds": 3.0} if weights else None,
            "generated_tokens": 40, "seconds": {"generation": 1.0, "words": 0.5 * words, "weights": 2.0 * weights},
            "compute_seconds": {"generation": 1.0, "words": 0.5 * words, "weights": 3.0 * weights}}


def _record(uid, method, solved_at, shift):
    """A conversation that fails until ``solved_at`` (None: never, in 2 turns); rosa2 rewrites, both update."""
    turns, last = [], solved_at or 2
    for n in range(1, last + 1):
        correct = n == solved_at
        turns.append(_turn(n, OPENING if n == 1 else REWRITE if method == "rosa2" else OPENING + " (feedback)",
                           "4" if correct else "7", correct, words=method == "rosa2" and not correct and n < 2,
                           weights=method in ("rosa2", "ttt") and not correct and n < 2))
    return {"unique_id": uid, "method": method, "solved": solved_at is not None, "turns_used": last,
            "semantic_gap": True, "posed": {"semantic_gap": True, "opening": OPENING, "withheld": [WITHHELD]},
            "l2_shift": shift, "turns": turns, "seconds": 3.0, "error": None,
            "seconds_split": {k: sum(t["seconds"][k] for t in turns) for k in ("generation", "words", "weights")}}


OUTCOMES = {"rosa2": [1, 2, None], "ttt": [1, None, None]}  # the turn each problem was solved at


@pytest.fixture()
def report_dir(tmp_path):
    for method, outcomes in OUTCOMES.items():
        (tmp_path / method).mkdir()
        results = ResultsFile(tmp_path / method / "results.jsonl")
        for i, solved_at in enumerate(outcomes):
            results.append(_record(f"test/algebra/{i}.json", method, solved_at, shift=0.1 * (i + 1)))
    build_report(tmp_path, list(OUTCOMES), turns=2, title="rosa2 - sharded user, T=2")
    return tmp_path


def test_the_summary_has_turn_bands_median_shift_and_kept_samples(report_dir):
    summary = json.loads((report_dir / "summary.json").read_text())["methods"]
    rosa2 = summary["rosa2"]
    assert rosa2["cumulative_accuracy_by_turn"] == pytest.approx([1 / 3, 2 / 3])
    for value, (low, high) in zip(rosa2["cumulative_accuracy_by_turn"], rosa2["cumulative_accuracy_by_turn_ci95"]):
        assert 0 <= low < value < high <= 1
    assert rosa2["median_l2_shift"] == pytest.approx(0.2)
    assert (rosa2["weights_steps"], rosa2["samples_drawn"], rosa2["samples_kept"]) == (2, 4, 2)
    assert "rosa2 2/4" in (report_dir / "report.md").read_text()


def test_report_html_is_one_self_contained_page_with_every_conversation(report_dir):
    page = (report_dir / "report.html").read_text()
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page)  # nothing fetched from elsewhere
    png = re.search(r'src="data:image/png;base64,([^"]+)"', page).group(1)
    assert base64.b64decode(png) == (report_dir / "accuracy_by_turn.png").read_bytes()
    assert page.count("<details class=conversation") == 6
    assert "<b>" not in page.split("<h2>Conversations</h2>")[1].split("<script>")[0].replace(
        "<b>rosa2</b>", "").replace("<b>ttt</b>", "")  # replies are escaped, never markup
    assert html_unescape(REWRITE) in html_unescape(page) and html_unescape(WITHHELD) in html_unescape(page)


def html_unescape(text: str) -> str:
    import html

    return html.unescape(text)


def _browser() -> str | None:
    for name in (os.environ.get("ROSA2_BROWSER"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def test_report_html_in_a_headless_browser_shows_the_table_and_filters_conversations(report_dir, tmp_path):
    browser = _browser()
    if browser is None:
        if os.environ.get("ROSA2_REQUIRE_BROWSER"):
            pytest.fail("no Chromium found (ROSA2_REQUIRE_BROWSER is set): apt-get install chromium")
        pytest.skip("no Chromium here (.ci/run installs it)")
    url = (report_dir / "report.html").as_uri() + "#method=rosa2&outcome=unsolved"
    done = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", url],
                          capture_output=True, text=True, timeout=120)
    dom = done.stdout
    assert done.returncode == 0 and "</html>" in dom, done.stderr[-2000:]
    # the table, as the browser laid it out: one row per method with its accuracy
    rows = re.findall(r"<tr><td[^>]*>(rosa2|ttt)</td><td>3</td><td>([\d.]+)%", dom)
    assert ("rosa2", "66.7") in rows and ("ttt", "33.3") in rows
    # the filter from the address ran: only rosa2's unsolved conversation is shown, with its rewrite
    shown = [m.group(0) for m in re.finditer(r"<details class=\"conversation\"(?![^>]*hidden)[^>]*>", dom)]
    assert shown == ['<details class="conversation" data-method="rosa2" data-outcome="unsolved">']
    assert re.search(r'id="shown">1 of 6 conversations<', dom)
    visible = dom.split('data-method="rosa2" data-outcome="unsolved">')[1].split("</details>")[0]
    assert "unsolved after 2 turns" in visible and html_unescape(REWRITE) in html_unescape(visible)


def test_paired_difference_counts_turns_an_unsolved_problem_as_the_budget():
    from rosa2_dspy.report import paired_difference

    def record(uid, solved_at):
        return {"unique_id": uid, "solved": solved_at is not None, "turns_used": solved_at or 3}

    a = [record("p1", 1), record("p2", 1), record("p3", None)]
    b = [record("p1", 2), record("p2", None), record("p3", None), record("p4", 1)]  # p4: not paired
    d = paired_difference(a, b, turns=3)
    assert d["problems"] == 3 and (d["a_only"], d["b_only"]) == (1, 0)
    assert d["turns_difference"] == pytest.approx(-1.0)  # (1-2) + (1-3) + (3-3), over 3
    low, high = d["turns_ci95"]
    assert -2 <= low <= -1 <= high <= 0
    assert "turns_difference" not in paired_difference(a, b)


def test_paired_intervals_do_not_depend_on_the_order_records_finished_in():
    """A report rebuilt from a run folder (records in the order they finished) gives the run's own intervals."""
    import random

    from rosa2_dspy.report import paired_difference

    outcomes = random.Random(0).choices([None, 1, 2, 3], k=40)
    a = [{"unique_id": f"p{i:02d}", "solved": s is not None, "turns_used": s or 3} for i, s in enumerate(outcomes)]
    b = [{**r, "solved": i % 3 == 0, "turns_used": 2 if i % 3 == 0 else 3} for i, r in enumerate(a)]
    first = paired_difference(a, b, turns=3, resamples=200)
    shuffled = a[::-1], random.Random(1).sample(b, len(b))
    assert paired_difference(*shuffled, turns=3, resamples=200) == first
    assert first["ci95"][0] < first["difference"] < first["ci95"][1]


def test_the_report_gives_turns_to_success_and_the_median_shift(report_dir):
    summary = json.loads((report_dir / "summary.json").read_text())
    assert summary["methods"]["rosa2"]["mean_turns_to_success"] == pytest.approx(1.5)  # solved at 1 and 2
    assert summary["methods"]["ttt"]["mean_turns_to_success"] == pytest.approx(1.0)
    assert summary["paired"]["rosa2 - ttt"]["turns_difference"] == pytest.approx(0.0)  # 1/2/2 against 1/2/2
    assert "| rosa2 | 3 | 66.7% (21%-94%) | 33% / 67% | 1.67 (1.50) | 0.2000 / 0.2000 |" in \
        (report_dir / "report.md").read_text()


def test_rosa2_report_rebuilds_a_partial_run_without_a_model(report_dir, capsys):
    from rosa2_dspy.cli import main

    (report_dir / "report.md").unlink()
    (report_dir / "config.json").write_text(json.dumps({"command": "bench compare", "turns": 2, "user": "sharded",
                                                        "limit": 5}))
    # a run still going may be mid-line: the report neither counts that line nor rewrites the writer's file
    results = report_dir / "ttt" / "results.jsonl"
    results.write_text(results.read_text() + '{"unique_id": "test/x.json", "meth')
    going = results.read_bytes()
    assert main(["report", str(report_dir)]) == 0
    assert results.read_bytes() == going
    text = (report_dir / "report.md").read_text()
    assert "Partial: problems done so far ttt 3, rosa2 3 of 5" in text and "| rosa2 - ttt | 3 |" in text
    assert text.index("| ttt | 3 |") < text.index("| rosa2 | 3 |")  # the methods in their usual order
    assert main(["report", str(report_dir / "rosa2")]) == 2
    assert "holds no run" in capsys.readouterr().err
    assert main(["report", str(report_dir), "--methods", "rosa2,nosuch"]) == 2
    assert "no results" in capsys.readouterr().err
    # another reference: ttt against each method (a run with a redesigned rosa2 beside the first design's)
    assert main(["report", str(report_dir), "--reference", "ttt"]) == 0
    text = (report_dir / "report.md").read_text()
    assert "| ttt - rosa2 | 3 |" in text and "| rosa2 - ttt |" not in text and "ttt minus each method" in text
    assert main(["report", str(report_dir), "--reference", "nosuch"]) == 2
    assert "no results in" in capsys.readouterr().err and "nosuch" not in (report_dir / "report.md").read_text()


def test_without_rosa2_its_variant_is_the_reference(report_dir):
    (report_dir / "rosa2").rename(report_dir / "rosa2@clarify_check=strict")
    build_report(report_dir, ["ttt", "rosa2@clarify_check=strict"], turns=2)
    paired = json.loads((report_dir / "summary.json").read_text())["paired"]
    assert list(paired) == ["rosa2@clarify_check=strict - ttt"]


def test_each_segment_of_a_run_is_recorded_and_the_report_names_its_code_and_stolen_time(report_dir, monkeypatch):
    """A run in segments (stopped, resumed on other code): each appends when, on which commit, how much CPU time
    the host stole and what the engine did in that segment alone; an interrupted one too; the report lists them."""
    from types import SimpleNamespace

    from rosa2_dspy import provenance
    from rosa2_dspy.models import cpu_description

    stat = "cpu  {} 0 {} {} 0 0 0 {} 0 0\ncpu0 1 2 3 4\n"
    readings = iter([stat.format(100, 10, 800, 90), stat.format(400, 20, 900, 190)])  # 510 ticks, 100 stolen
    monkeypatch.setattr(provenance, "cpu_ticks", lambda: provenance._parse(next(readings)))
    engine = SimpleNamespace(stats={"steps": 10, "row_steps": 50, "step_seconds": 5.0, "max_batch_seen": 8})
    with provenance.segment(report_dir, engine):
        engine.stats.update(steps=14, row_steps=90, step_seconds=7.5, max_batch_seen=12)
    readings = iter([stat.format(0, 0, 100, 0), stat.format(0, 0, 150, 50)])
    monkeypatch.setattr(provenance, "code_version", lambda: "abc1234")
    with pytest.raises(KeyboardInterrupt), provenance.segment(report_dir):
        raise KeyboardInterrupt
    first, second = provenance.read_segments(report_dir)
    assert first["outcome"] == "finished" and second["outcome"] == "interrupted"
    readings = iter([stat.format(0, 0, 100, 0)] * 2)
    with provenance.segment(report_dir) as line:  # a drained run: it ended with items still to run
        line["items_left"] = 3
    assert provenance.read_segments(report_dir)[-1]["outcome"] == "stopped early"
    (report_dir / provenance.SEGMENTS).write_text(
        "".join(json.dumps(s) + "\n" for s in (first, second)))
    assert first["cpu_stolen"] == pytest.approx(100 / 510, abs=1e-4) and second["cpu_stolen"] == 0.5
    assert first["engine"] == {"steps": 4, "row_steps": 40, "step_seconds": 2.5, "max_batch_seen": 12}
    assert second["code"] == "abc1234" and first["code"] != "abc1234" and first["peak_rss_mib"] > 0
    assert first["cpu"] == cpu_description() and first["cpu"].strip()
    second["cpu"] = "Another CPU, avx512_bf16, amx_bf16"  # the next session's machine
    (report_dir / provenance.SEGMENTS).write_text("".join(json.dumps(s) + "\n" for s in (first, second)))
    build_report(report_dir, list(OUTCOMES), turns=2, title="t")
    text = (report_dir / "report.md").read_text()
    assert (f"Ran in 2 segments ({first['started']} to {second['ended']}) on code {first['code']}, abc1234, on CPUs "
            f"{first['cpu']}; Another CPU, avx512_bf16, amx_bf16") in text
    assert "CPU time stolen by the host: 20% to 50% per segment" in text


def test_stolen_time_is_read_from_proc_stat_and_absent_without_it():
    from rosa2_dspy.provenance import cpu_ticks, stolen_fraction

    assert cpu_ticks("cpu  1 2 3 4 5 6 7 8 9 10\n") == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert cpu_ticks("intr 5\n") is None and stolen_fraction(None, [0] * 8) is None
    assert stolen_fraction([0] * 8, [30, 0, 10, 40, 0, 0, 0, 20]) == 0.2


def test_with_retry_each_adapting_method_is_paired_with_the_control(tmp_path):
    """retry (the further turns without adaptation) is the control: each method that adapted is paired with it
    too, one that did not (single) is not; the pair's discordant problems are counted A against B."""
    outcomes = {"rosa2": [1, 2, None], "ttt": [1, 2, 2], "retry": [1, None, None], "single": [1, None, None]}
    for method, solved in outcomes.items():
        (tmp_path / method).mkdir()
        results = ResultsFile(tmp_path / method / "results.jsonl")
        for i, solved_at in enumerate(solved):
            results.append(_record(f"test/algebra/{i}.json", method, solved_at, shift=0.1))
    build_report(tmp_path, list(outcomes), turns=2)
    paired = json.loads((tmp_path / "summary.json").read_text())["paired"]
    assert set(paired) == {"rosa2 - ttt", "rosa2 - retry", "rosa2 - single", "ttt - retry"}
    assert (paired["ttt - retry"]["a_only"], paired["ttt - retry"]["b_only"]) == (2, 0)
    report = (tmp_path / "report.md").read_text()
    assert "| ttt - retry | 3 | +66.7% (" in report and "minus `retry`, the same turns without adaptation" in report


def test_the_words_steps_next_turn_is_paired_with_retry_and_split_by_kept_and_fallback(tmp_path):
    def conversation(uid, method, correct_by_turn, fallback=None):
        turns = [_turn(n, OPENING, "4" if ok else "7", ok, words=method == "pe" and not ok)
                 for n, ok in enumerate(correct_by_turn, 1)]
        for turn in turns:
            if turn["words"] and fallback:
                turn["words"]["fallback"] = fallback
        return {"unique_id": uid, "method": method, "solved": correct_by_turn[-1], "turns_used": len(turns),
                "l2_shift": 0.0, "turns": turns, "seconds": 1.0, "error": None,
                "seconds_split": {"generation": 1.0, "words": 0.0, "weights": 0.0}}

    runs = {"retry": [conversation("p0", "retry", [False, False, True]), conversation("p1", "retry", [False, True]),
                      conversation("p2", "retry", [True])],
            "pe": [conversation("p0", "pe", [False, True]),  # kept: right where retry was wrong
                   conversation("p1", "pe", [False, False, False], fallback="it drops the number(s) 3"),
                   conversation("p2", "pe", [False, True])]}  # retry ended at turn 1: nothing to pair
    for method, records in runs.items():
        (tmp_path / method).mkdir()
        results = ResultsFile(tmp_path / method / "results.jsonl")
        for record in records:
            results.append(record)
    report = build_report(tmp_path, ["retry", "pe"], turns=3).read_text()
    next_turn = json.loads((tmp_path / "summary.json").read_text())["words_next_turn"]
    assert list(next_turn) == ["pe"]  # retry takes no words step
    # (pe's fallback repeated its rejected answer; retry's turn 2 was new and right, then it ended)
    assert next_turn["pe"] == {"kept": {"steps": 1, "changed": 1, "correct": 1, "control_changed": 0,
                                        "control_correct": 0},
                               "fallback": {"steps": 1, "changed": 0, "correct": 0, "control_changed": 1,
                                            "control_correct": 1}}
    assert "| pe | kept | 1 | 1 (100%) | 1 (100%) | 0 (0%) | 0 (0%) |" in report
    assert "| pe | fallback | 1 | 0 (0%) | 0 (0%) | 1 (100%) | 1 (100%) |" in report


def test_every_failed_turns_next_turn_is_counted_by_turn_against_retry(tmp_path):
    def conversation(uid, method, answers, gold="4"):
        turns = [_turn(n, OPENING, a, a == gold) for n, a in enumerate(answers, 1)]
        return {"unique_id": uid, "method": method, "solved": answers[-1] == gold, "turns_used": len(turns),
                "l2_shift": 0.0, "turns": turns, "seconds": 1.0, "error": None,
                "seconds_split": {"generation": 1.0, "words": 0.0, "weights": 0.0}}

    runs = {"retry": [conversation("p0", "retry", ["7", "7", "7"]), conversation("p1", "retry", ["7", "4"]),
                      conversation("p2", "retry", ["4"]), conversation("p3", "retry", ["7", "7"])],
            "ttt": [conversation("p0", "ttt", ["7", "5", "4"]), conversation("p1", "ttt", ["7", "7", "7"]),
                    conversation("p2", "ttt", ["7", "4"]),  # p2: retry solved turn 1, nothing to pair
                    {**conversation("p3", "ttt", ["7", "5"]), "error": "RuntimeError: lost"}],  # counts nowhere
            "single": [conversation("p0", "single", ["7"])]}  # one turn: no next turn to count
    for method, records in runs.items():
        (tmp_path / method).mkdir()
        results = ResultsFile(tmp_path / method / "results.jsonl")
        for record in records:
            results.append(record)
    report = build_report(tmp_path, list(runs), turns=3).read_text()
    by_turn = json.loads((tmp_path / "summary.json").read_text())["next_turn_by_turn"]
    assert list(by_turn) == ["retry", "ttt"]
    assert by_turn["ttt"] == {"turn 1": {"steps": 2, "changed": 1, "correct": 0, "control_changed": 1,
                                               "control_correct": 1},
                              "turn 2": {"steps": 1, "changed": 1, "correct": 1, "control_changed": 0,
                                               "control_correct": 0}}
    assert by_turn["retry"]["turn 2"] == {"steps": 1, "changed": 0, "correct": 0, "control_changed": 0,
                                                "control_correct": 0}
    assert "| ttt | turn 1 | 2 | 1 (50%) | 0 (0%) | 1 (50%) | 1 (50%) |" in report
    assert "| ttt | turn 2 | 1 | 1 (100%) | 1 (100%) | 0 (0%) | 0 (0%) |" in report


def test_the_peak_watch_names_the_phase_that_raised_the_memory_peak(monkeypatch):
    """A phase that raises the high-water mark is recorded with its facts (the dear ones read only then); a phase that
    does not raise it leaves the record alone; a rise between watched phases is "between"; peak() is the highest."""
    from rosa2_dspy import memory

    marks = iter([(5.0, 10.0), (6.0, 12.0),  # a step raises the mark from 10 to 12
                  (6.0, 12.0), (6.0, 12.0),  # an update that does not
                  (7.0, 15.0), (9.0, 20.0)])  # something between raised it to 15, then an update to 20
    monkeypatch.setattr(memory, "rss_and_peak_mib", lambda: next(marks))
    asked = []
    watch = memory.PeakWatch()
    with watch.watch("step", {"rows": 3}, lambda: asked.append(1) or {"kv_cache_mib": 1.5}):
        pass
    assert watch.record == {"step": {"peak_rss_mib": 12.0, "rss_before_mib": 5.0, "rows": 3, "kv_cache_mib": 1.5}}
    with watch.watch("update", {"paused_rows": 2}, lambda: asked.append(2) or {}):
        pass
    assert "update" not in watch.record and asked == [1]
    with watch.watch("update", {"paused_rows": 1}):
        pass
    assert watch.record["between"] == {"peak_rss_mib": 15.0}
    assert watch.peak() == ("update", {"peak_rss_mib": 20.0, "rss_before_mib": 7.0, "paused_rows": 1})
    monkeypatch.setattr(memory, "rss_and_peak_mib", lambda: None)  # off Linux: nothing read, nothing recorded
    with memory.PeakWatch().watch("step") as nothing:
        assert nothing is None


def test_free_heap_pages_are_handed_back_to_the_kernel():
    """Chunks under glibc's mmap threshold stay in its heap when freed (every other one: no free top to trim on its
    own); release_free_heap returns their pages and says by how much the resident size fell."""
    import torch

    from rosa2_dspy.memory import release_free_heap, rss_and_peak_mib

    if release_free_heap() is None:
        pytest.skip("no glibc here")
    torch.ones(1 << 20)  # freed at once: a freed 4 MiB mapping raises glibc's threshold, so the next come from the heap
    chunks = [torch.ones(1 << 20) for _ in range(64)]  # 256 MiB in 4 MiB chunks, touched
    del chunks[::2]
    before = rss_and_peak_mib()[0]
    released = release_free_heap()
    assert released >= 100 and before - rss_and_peak_mib()[0] >= 100  # of the 128 MiB freed


def test_rss_and_peak_are_read_from_this_process():
    from rosa2_dspy.memory import peak_rss_since_reset_mib, rss_and_peak_mib

    rss, peak = rss_and_peak_mib()
    assert 0 < rss <= peak and peak_rss_since_reset_mib() >= peak


def test_a_reports_segment_line_names_the_peak_and_the_phase_that_set_it():
    from rosa2_dspy.provenance import describe_peak, describe_segments

    record = {"step": {"peak_rss_mib": 9000.0, "rss_before_mib": 8000.0, "rows": 20, "kv_cache_mib": 900.0},
              "update": {"peak_rss_mib": 12345.6, "rss_before_mib": 10900.0, "paused_rows": 18,
                         "kv_cache_mib": 1200.4, "pinned_adapters": 31, "pinned_mib": 1100.0},
              "between": {"peak_rss_mib": 8500.0}}
    first = {"started": "a", "ended": "b", "code": "c1", "peak_rss_mib": 12345.6, "engine": {"peak_set_by": record}}
    second = {"started": "c", "ended": "d", "code": "c1", "peak_rss_mib": 7000.0}
    assert describe_peak(first) == ("peak RSS 12,346 MiB, set by a weight update (10,900 MiB resident before it, "
                                    "a 1,200 MiB KV cache, 31 pinned adapters of 1,100 MiB)")
    assert describe_peak(second) == "peak RSS 7,000 MiB" and describe_peak({}) == ""
    assert describe_segments([second, first]).endswith(f"; {describe_peak(first)} (segments.jsonl).")
    record["update"]["peak_rss_mib"], record["between"]["peak_rss_mib"] = 11000.0, 12345.6  # another thread set it
    assert describe_peak(first) == "peak RSS 12,346 MiB, set by work between the engine's steps and updates"
