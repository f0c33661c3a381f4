"""The ``rosa2`` command line: every subcommand and its flags (the session's come from
:data:`rosa2_dspy.experiments.SESSION_SETTINGS`)."""

from __future__ import annotations

import argparse


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split", default="math500", help="train, test, math500 (packaged) or a hub dataset id")
    p.add_argument("--data", dest="data_file", help="your own JSONL file instead of a split")
    p.add_argument("--input-field", default="problem", help="field holding the problem text (with --data)")
    p.add_argument("--answer-field", default="answer", help="field holding the gold answer (with --data)")
    p.add_argument("--subject", help="comma-separated subjects, e.g. 'Algebra,Number Theory'")
    p.add_argument("--level", help="comma-separated levels 1-5")
    p.add_argument("--ids", help="comma-separated unique_ids")
    p.add_argument("--limit", type=int, help="at most this many problems (after filters and shuffle)")
    p.add_argument("--seed", type=int, default=0, help="seed for the problem shuffle and sampling (default 0)")
    p.add_argument("--no-shuffle", action="store_true", help="keep the file order instead of a seeded shuffle")


MODEL_HELP = ("'default' (embedded Qwen2.5-Coder-1.5B-Instruct), 'tiny' (embedded SmolLM2-135M-Instruct), a local HF "
              "folder, or a hub id")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help=MODEL_HELP)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (by device capability), float32, bfloat16, float16")
    p.add_argument("--batching", choices=["padded", "continuous"], default="continuous",
                   help="continuous (default): requests join and leave one running batch step by step, each reply "
                        "ending when it ends; padded: concurrent requests run as one left-padded generate that "
                        "waits for its longest row")
    _add_prepack_arg(p)


def _add_prepack_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prepack", action=argparse.BooleanOptionalAction, default=None,
                   help="serve the model from oneDNN-prepacked weights, which replace the plain ones inside its "
                        "blocks: 1.3-2.4x per decode step at batch 16 on a 2-core CPU, one more copy of the output "
                        "head only (default: on for a CPU model in bf16, where outputs and updates are the same bit "
                        "for bit, and in float32, where they round differently and a run folder records it; off "
                        "elsewhere)")


PROGRAM = "programs/math_solver.py"


def _add_run_args(p: argparse.ArgumentParser, *, out: str, threads: int, threads_help: str,
                  max_tokens: int = 1024, progress: bool = True) -> None:
    """The flags every command that runs a program shares: the program, the generation budget, calls in
    flight, the output folder and (for long runs) the progress bar."""
    p.add_argument("--program", default=PROGRAM, help=f"the prompt program: path.py or path.py:Class (default {PROGRAM})")
    p.add_argument("--max-tokens", type=int, default=max_tokens,
                   help=f"generation budget per call (default {max_tokens}: the 1.5B default's MATH replies run long)")
    p.add_argument("--threads", type=int, default=threads, help=f"{threads_help} (default {threads})")
    p.add_argument("--out", required=True, help=out)
    if progress:
        p.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")


def _add_ray_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="shard the problems over Ray actors, each with its own engine: a cluster address (auto, "
                        "ray://host:10001), or none to start a local Ray instance (pip install 'rosa2-dspy[ray]')")
    p.add_argument("--ray-actors", type=int, default=2, help="Ray actors, one engine each (default 2)")
    p.add_argument("--ray-cpus", type=float, default=1,
                   help="CPU cores each actor reserves; its torch uses that many threads (default 1)")


def _add_session_args(p: argparse.ArgumentParser, method_default: str | None, **defaults) -> None:
    """The session's flags, from :data:`rosa2_dspy.experiments.SESSION_SETTINGS` (its type, default and help);
    ``defaults`` overrides a default for this command."""
    from rosa2_dspy.experiments import SESSION_SETTINGS, session_defaults, session_setting_type

    if method_default is None:
        p.add_argument("--method", help="multi-turn method: single, pe, ttt, pe-then-ttt, rosa2, or a session recipe "
                                       "(optimizers/rosa2.toml); default: one plain pass")
    p.add_argument("--user", default="vague",
                   help="simulated user: oracle ('Incorrect.'), vague (default: a contentless complaint), hint (the "
                        "failure kind), sharded (withholds one or two conditions and reveals one per failed turn)")
    values = {**session_defaults(), **defaults}
    for name, setting in SESSION_SETTINGS.items():
        default = values[name]
        if session_setting_type(name) is bool:  # --name / --no-name
            p.add_argument(f"--{name.replace('_', '-')}", action=argparse.BooleanOptionalAction, default=default,
                           help=setting.help)
            continue
        p.add_argument(f"--{name.replace('_', '-')}", type=session_setting_type(name), default=default,
                       choices=setting.choices,
                       help=setting.help + ("" if default is None else f" (default {default})"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rosa2", description="Co-adapt the words and weights of a language model.")
    sub = parser.add_subparsers(dest="command", required=True)

    ev = sub.add_parser("eval", help="evaluate a prompt program on MATH problems")
    ev.add_argument("--clarify", action="store_true", help="construct the program with clarify=True")
    ev.add_argument("--adapter", help="DSPy adapter for the program: boxed (default), chat, json, xml")
    _add_data_args(ev)
    _add_model_args(ev)
    _add_run_args(ev, out="run folder: results.jsonl, summary.json", threads=32,
                  threads_help="problems in flight; the engine batches them (32 is its largest batch: on 2 cores the "
                               "1.5B model gives 1.4x the problems per minute of 16)")
    ev.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    ev.add_argument("--cache", action="store_true", help="use DSPy's response cache (off: timings stay honest)")
    ev.add_argument("--compiled", help="a folder written by `rosa2 compile`: its words and adapter are used")
    ev.add_argument("--allow-overlap", action="store_true",
                    help="evaluate --compiled even on problems its compile trained or validated on")
    _add_session_args(ev, method_default=None)
    _add_ray_args(ev)

    co = sub.add_parser("compile", help="optimize a program's words and/or weights on training problems")
    co.add_argument("--clarify", action="store_true", help="construct the program with clarify=True")
    co.add_argument("--adapter", help="DSPy adapter for the program: boxed (default), chat, json, xml")
    co.add_argument("--optimizer", required=True, help="a recipe: optimizers/lora.toml, words.toml, gepa.toml ...")
    _add_data_args(co)
    co.set_defaults(split="train")
    co.add_argument("--val-limit", type=int, default=0,
                    help="problems after the first --limit held out as the validation set (default: none)")
    _add_model_args(co)
    _add_run_args(co, out="artifact folder: program.json, adapter/, compile.json", threads=8,
                  threads_help="calls in flight; the engine batches them", progress=False)

    bench = sub.add_parser("bench", help="benchmarks that print JSON")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    be = bench_sub.add_parser("engine", help="engine throughput against raw transformers and the bandwidth bound")
    be.add_argument("--model", default="default", help=MODEL_HELP)
    _add_prepack_arg(be)
    be.add_argument("--max-tokens", type=int, default=96, help="tokens generated per prompt (default 96)")
    be.add_argument("--concurrency", type=int, default=8,
                    help="prompts sent at once through DSPy for the concurrent figure (default 8)")
    be.add_argument("--cache-variants", action="store_true",
                    help="also time raw generate with a static KV cache and with torch.compile (slow: compiles)")
    be.add_argument("--batch-sizes", default="1,8,16,32",
                    help="decode and prefill tokens/s against the roofline at these batch sizes (default 1,8,16,32; "
                         "'' skips)")
    be.add_argument("--repeats", type=int, default=3,
                    help="runs per batch size for the roofline; the fastest is reported, every one in step_ms_runs "
                         "(default 3)")
    be.add_argument("--mixed-weights", type=int, default=0, metavar="K",
                    help="also time a batch whose rows carry K different adapters (2 rows each)")
    bu = bench_sub.add_parser("update", help="LoRA update through TRL against a raw PyTorch loop")
    bu.add_argument("--model", default="default", help=MODEL_HELP)
    _add_prepack_arg(bu)
    bu.add_argument("--objective", default="sft", choices=["sft", "kto", "apo_zero_unpaired"],
                    help="sft: SFTTrainer on the rows; kto, apo_zero_unpaired: KTOTrainer with that loss (default sft)")
    bu.add_argument("--rows", type=int, default=8, help="training rows, 1..8 (fewer than --batch-size: a smaller "
                    "batch; kto takes at least 2, repeating a lone row)")
    bu.add_argument("--steps", type=int, default=4, help="optimizer steps per update (default 4)")
    bu.add_argument("--batch-size", type=int, default=4, help="rows per optimizer step (default 4)")
    bu.add_argument("--updates", type=int, default=3, help="updates per path (the first pays construction)")
    bu.add_argument("--answer-batch", type=int, default=16,
                    help="update_over_generation: an answer's share of a batch of this many rows (0 skips it)")
    bu.add_argument("--answer-tokens", type=int, default=1024, help="... an answer of this many tokens (default 1024)")
    bu.add_argument("--layers", type=int, default=None, metavar="N",
                    help="adapt only the last N transformer blocks, so the backward pass stops there (default: all)")
    from rosa2_dspy.weights.config import ADAPTER_DTYPES

    bu.add_argument("--adapter-dtype", default="float32", choices=ADAPTER_DTYPES,
                    help="the adapter's dtype on a 16-bit model: float32 (PEFT's default) or the model's own")
    bu.add_argument("--completion-tokens", type=int, default=None, metavar="N",
                    help="each row's target repeated to N tokens, a long reply's length (default: as written)")
    bu.add_argument("--activation-checkpointing", action="store_true",
                    help="keep only each block's input and recompute its forward in the backward pass")
    bu.add_argument("--frozen-prompt", action="store_true",
                    help="run each row's prompt once without gradients (a cached prefix) and train on the reply "
                         "columns only: a cheaper, different update (UpdateConfig.frozen_prompt)")
    bu.add_argument("--reply-tail", type=int, default=None, metavar="N",
                    help="score only each reply's last N tokens (UpdateConfig.reply_tail; not with sft)")
    bu.add_argument("--prompt-tokens", type=int, default=None, metavar="N",
                    help="each row's problem repeated to a prompt of about N tokens, a later turn's length "
                         "(default: as written)")

    bc = bench_sub.add_parser("compare", help="every method on the same problems, seeds and turn budget")
    _add_data_args(bc)
    bc.set_defaults(split="test", level="1")
    _add_model_args(bc)
    _add_session_args(bc, method_default="all")
    bc.add_argument("--methods", help="comma-separated methods (default single,pe,ttt,pe-then-ttt,rosa2; with "
                                      "--user sharded also whole, the whole problem in one pass); a variant "
                                      "sets session settings for one method, e.g. rosa2@learning_rate=1e-3")
    bc.add_argument("--compiled", help="start every conversation from this `rosa2 compile` artifact (words + adapter)")
    bc.add_argument("--allow-overlap", action="store_true",
                    help="run --compiled even on problems its compile trained or validated on")
    _add_run_args(bc, out="run folder: <method>/results.jsonl, greedy.jsonl, segments.jsonl, summary.json, "
                          "report.md, report.html", threads=32,
                  threads_help="conversations in flight, every method's together (32 is the engine's largest batch); "
                               "problems run in order, so a run cut short keeps the conversations it finished, and a "
                               "problem's turn 1 is generated once for all methods")
    _add_ray_args(bc)

    bk = bench_sub.add_parser("compile", help="compile-time methods side by side: same training and test problems")
    _add_data_args(bk)
    bk.set_defaults(split="train", level="1")
    bk.add_argument("--val-limit", type=int, default=0,
                    help="validation problems after the first --limit (default: none; each recipe then holds its "
                         "own out of the training problems, drawn once)")
    bk.add_argument("--recipes", default="optimizers/words.toml,optimizers/lora.toml,optimizers/p-then-w.toml,"
                                         "optimizers/rosa2-compile.toml,optimizers/better-together.toml",
                    help="comma-separated compile recipes (optimizers/*.toml), each compiled once and evaluated beside "
                         "the uncompiled baseline (default: words, lora, p-then-w, rosa2-compile, better-together)")
    bk.add_argument("--eval-split", default="test", help="split the compiled programs are evaluated on (default test)")
    bk.add_argument("--eval-level", default="1", help="comma-separated levels of the evaluation problems (default 1)")
    bk.add_argument("--eval-limit", type=int, default=20, help="evaluation problems (default 20)")
    bk.add_argument("--allow-overlap", action="store_true",
                    help="evaluate even on problems among the training or validation problems")
    _add_model_args(bk)
    _add_run_args(bk, out="run folder: <recipe>/artifact and <recipe>/results.jsonl per recipe, baseline/, report.md",
                  threads=8, threads_help="calls in flight; the engine batches them")

    sh = sub.add_parser("shards", help="how many problems a sharded user poses with a semantic gap (no model)")
    _add_data_args(sh)
    sh.set_defaults(split="test", level="1,2,3")
    sh.add_argument("--show", type=int, default=0, help="also print this many problems as the user poses them")

    rp = sub.add_parser("report", help="rebuild a comparison's report from its run folder, finished or not")
    rp.add_argument("out", help="the --out folder of a bench compare or eval --method run")
    rp.add_argument("--methods", help="comma-separated methods (default: every method folder there)")
    rp.add_argument("--reference", help="the method paired against each other one (default: rosa2, else the first "
                                        "rosa2 variant, else the first method)")

    info = sub.add_parser("info", help="versions, device, precision and model source")
    _add_model_args(info)
    info.add_argument("--load", action="store_true", help="also load the model and time it")
    return parser
