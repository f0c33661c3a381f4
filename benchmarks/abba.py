"""Run one benchmark command under two environment settings, one process each, in the order A B B A.

An A/B of a setting that a process reads once at start (an environment variable such as PyTorch's
``THP_MEM_ALLOC_ENABLE``) needs a fresh process per run; the A B B A order puts drift in the host's speed on both
settings alike. Each run's stdout must end with one JSON object (what ``rosa2 bench ...`` prints); the harness
keeps it whole, with the run's wall time and its peak RSS (the kernel's ``ru_maxrss`` of that one child), and for
each ``--metric`` (a dotted path into that JSON) prints the mean under A and under B and their ratio B / A.

    python benchmarks/abba.py --a THP_MEM_ALLOC_ENABLE=0 --b THP_MEM_ALLOC_ENABLE=1 \\
        --metric roofline.batches.16.step_ms -- rosa2 bench engine --model default --batch-sizes 1,16

Progress goes to stderr, one line per run; the JSON result to stdout (and ``--out``, written when all runs end).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone


def _setting(text: str) -> dict[str, str]:
    env = {}
    for item in filter(None, text.split(",")):
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise argparse.ArgumentTypeError(f"expected NAME=VALUE[,NAME=VALUE...], got {item!r}")
        env[name] = value
    return env


def _last_json(stdout: str) -> dict:
    """The last JSON object in a run's stdout (a pretty-printed one spans lines: read from its last '{' line)."""
    lines = stdout.rstrip().splitlines()
    for start in range(len(lines) - 1, -1, -1):
        if lines[start].lstrip().startswith("{"):
            try:
                return json.loads("\n".join(lines[start:]))
            except json.JSONDecodeError:
                continue
    raise ValueError("the command printed no JSON object at the end of its output")


def _pick(result: dict, path: str):
    value = result
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def run_once(command: list[str], env: dict[str, str]) -> dict:
    started = time.perf_counter()
    proc = subprocess.Popen(command, env={**os.environ, **env}, stdout=subprocess.PIPE, text=True)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)  # (the one child's own peak RSS, which Popen.wait does not give)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"abba: {' '.join(command)} exited {code} under {env}")
    return {"env": env, "wall_s": round(time.perf_counter() - started, 1),
            "max_rss_mib": round(usage.ru_maxrss / 1024), "result": _last_json(stdout)}


def summarise(runs: list[dict], metrics: list[str]) -> dict:
    out = {}
    for path in metrics + ["wall_s", "max_rss_mib"]:
        values = {}
        for label in ("a", "b"):
            picked = [_pick(r["result"], path) if path in metrics else r[path] for r in runs if r["setting"] == label]
            values[label] = [v for v in picked if isinstance(v, (int, float))]
        if values["a"] and values["b"]:
            a, b = statistics.mean(values["a"]), statistics.mean(values["b"])
            out[path] = {"a": values["a"], "b": values["b"], "mean_a": round(a, 3), "mean_b": round(b, 3),
                         "b_over_a": round(b / a, 4) if a else None}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", type=_setting, required=True, help="setting A: NAME=VALUE[,NAME=VALUE...]")
    parser.add_argument("--b", type=_setting, required=True, help="setting B, likewise")
    parser.add_argument("--metric", action="append", default=[], help="a dotted path into the JSON (repeatable)")
    parser.add_argument("--rounds", type=int, default=1, help="A B B A rounds (default 1: four runs)")
    parser.add_argument("--out", help="also write the JSON result here")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    runs = []
    began = datetime.now(timezone.utc).isoformat(timespec="seconds")
    for label in "abba" * args.rounds:
        run = {"setting": label, **run_once(command, getattr(args, label))}
        runs.append(run)
        print(f"abba: run {len(runs)}/{4 * args.rounds} ({label}: {run['env']}) {run['wall_s']} s, "
              f"{run['max_rss_mib']} MiB; " + ", ".join(f"{m}={_pick(run['result'], m)}" for m in args.metric),
              file=sys.stderr, flush=True)
    result = {"command": command, "a": args.a, "b": args.b, "order": "abba" * args.rounds, "started": began,
              "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"), "host": platform.node(),
              "summary": summarise(runs, args.metric), "runs": runs}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        tmp = f"{args.out}.tmp"
        with open(tmp, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
