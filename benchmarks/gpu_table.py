"""The paper's throughput table on one GPU in one command, within a time budget: every strategy on the captured
engine, continuous batching at equal memory, train.sh's smoke run, and a decode step timed on the captured and graph
engines; on request, the graph, compiled and eager engines on the same samples.

    python -m benchmarks.gpu_table --output-dir runs/gpu-table          # Vicuna-7B shape, random fp16 weights

Each part is one process whose output goes to `log.txt` as it comes, and whose finished strategies are kept after each
one (in its `--output-json`'s `.partial` until the part ends), so a run cut off by the budget (or by the machine)
still returns every strategy that finished. A part that would start after the deadline is skipped, and one still
running at the deadline is stopped.

1. captured (the graph engine's loop with its eager step captured in CUDA graphs: no compilation, so the table does
   not wait minutes for torch.compile): vanilla, gt+vbs+fcr, gt (and proxy+vbs+fcr when --predictor-path holds a proxy
   predictor; file+vbs+fcr and file+fcr+resume, the proxy's rows from src.predict's file, when --predictions-path names
   one: a GPU host without the encoder's package schedules with predictions made elsewhere)
2. graph, 3. compiled, 4. eager (with `--parts`): vanilla and gt+vbs+fcr, the engines compared on the same samples,
   and every strategy of the table that no earlier part returned. The graph and then the compiled part also run
   unasked when the parts before them left some of the table out (an engine that fails on a GPU still leaves a whole
   table).
5. continuous batching, FCFS and shortest-predicted-first (continuous:gt), with the slots that the KV cache of the
   static parts' largest batch holds (`--slots auto` across processes), at `--continuous-speed` (CUDA graphs by
   default); if that fails before any result, once more at the manager's plain settings (`continuous-plain`).
   Continuous batching is transformers' manager on every engine, so this part runs on the eager one.
6. train: benchmarks.train_smoke, `bash train.sh` for a few LoRA steps on the same model, the adapter saved and loaded
   by `src.eval --strategy seqsch`, in `train/`
7. step: benchmarks.decode_step, one decode step of --batch-size rows at a 768-token cache on the captured and the
   graph engine, with what compiling and capturing each cost; last, since the graph engine's compilation is the
   longest wait of the run

The summary (`summary.json`, and a Markdown table printed and written to `table.md`) gives each strategy's
samples/s, its ratio to vanilla on the same engine, decode steps and ms per step (per iteration of the iteration
model, for continuous batching), prefill and other seconds summed over its batches, and the warm-up each engine
spent on new shapes (kept out of the throughput), then the step part's figures.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from src.common.utils import partial_path, write_json_atomic, write_text_atomic
from src.engines.base import CONTINUOUS_SPEEDS, DEFAULT_CONTINUOUS_SPEED
from src.predictors.proxy import proxy_available
from src.running.settings import equal_memory_slots

ROOT = Path(__file__).resolve().parents[1]

# static parts and the engine each runs on (run_static_parts says which strategies each one runs)
STATIC_PARTS = {"captured": "captured", "graph": "graph", "compiled": "compiled", "eager": "transformers"}
# the shipped predictor's src.predict lines for the paper's val set (data/README.md)
SHIPPED_PREDICTIONS = "data/alpaca-val-10k-proxy.jsonl.gz"
COMPARED_STRATEGIES = ["vanilla", "gt+vbs+fcr"]
PLAIN_STRATEGIES = ("vanilla", "gt+vbs+fcr", "gt")  # the table's rows that need no predictor's flags
# each runs, asked for or not, what the static parts before it left out of the table
FALLBACK_PARTS = ("graph", "compiled")
CONTINUOUS_PART = "continuous"
PLAIN_CONTINUOUS_PART = "continuous-plain"  # the fallback at the manager's plain settings
# benchmarks.train_smoke (train.sh for a few steps, the adapter loaded by src.eval); its paper preset needs CUDA
TRAIN_PART = "train"
# benchmarks.decode_step: one step of --batch-size rows at a 768-token cache on the captured and
# graph engines in one process, with each one's compilation and captures (warmup_s)
STEP_PART = "step"
STEP_ENGINES = ["captured", "graph"]
STEP_CONTEXT, STEP_TOKENS = 640, 64  # a cache of 704 tokens, rounded up to 768
PARTS = (*STATIC_PARTS, CONTINUOUS_PART, TRAIN_PART, STEP_PART)
DEFAULT_PARTS = ["captured", CONTINUOUS_PART, TRAIN_PART, STEP_PART]
OUTPUT_PARTS = (*STATIC_PARTS, CONTINUOUS_PART, PLAIN_CONTINUOUS_PART)  # the parts that write a benchmark JSON


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/gpu-table", help="each part's JSON, log.txt, summary, table")
    parser.add_argument("--model", default="vicuna-7b-shape")
    parser.add_argument("--load-format", default="dummy")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--data-path", default="data/alpaca-val-10k.json")
    parser.add_argument("--replay-lengths", default="data/alpaca-val-10k-length.json")
    parser.add_argument("--replay-field", default="L_t0.0")
    parser.add_argument("--num-data", type=int, default=256, help="the same samples for every strategy")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument(
        "--predictor-path", default="predictors/proxy-vicuna-7b", help="adds proxy+vbs+fcr when present"
    )
    parser.add_argument(
        "--predictions-path",
        default=SHIPPED_PREDICTIONS,
        help="src.predict's lines for these samples: adds file+vbs+fcr and file+fcr+resume (the proxy's rows where its "
        "encoder's package is not installed; default: the shipped predictor's for the paper's val set); '' for none",
    )
    parser.add_argument("--budget-s", type=float, default=450, help="no part starts, and none runs, past this")
    parser.add_argument("--parts", nargs="+", default=DEFAULT_PARTS, choices=PARTS)
    parser.add_argument(
        "--continuous-speed",
        default=DEFAULT_CONTINUOUS_SPEED,
        choices=CONTINUOUS_SPEEDS,
        help="continuous batching's step settings (src.benchmark's flag)",
    )
    return parser.parse_args(argv)


def common_flags(args) -> list[str]:
    return [
        "--model", args.model, "--load-format", args.load_format, "--device", args.device, "--dtype", args.dtype,
        "--data-path", args.data_path, "--replay-lengths", args.replay_lengths, "--replay-field", args.replay_field,
        "--num-data", str(args.num_data), "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
    ]  # fmt: skip


def log(out: Path, text: str) -> None:
    print(text, flush=True)
    with open(out / "log.txt", "a") as handle:
        handle.write(text + "\n")


def run_part(out: Path, name: str, flags: list[str], deadline: float) -> int | None:
    """One benchmark process, its output streamed to the terminal and the log; stopped at the deadline."""
    command = [sys.executable, "-m", "src.benchmark", *flags, "--output-json", str(out / f"{name}.json")]
    return run_logged(out, name, command, deadline)


def run_logged(out: Path, name: str, command: list[str], deadline: float) -> int | None:
    """One process, from the project's root, its output streamed to the terminal and to `log.txt` as it comes;
    stopped at the deadline (None: skipped or stopped, else its exit status)."""
    remaining = deadline - time.monotonic()
    if remaining < 5:
        log(out, f"== {name}: skipped, the budget is spent")
        return None
    log(out, f"== {name} ({remaining:.0f} s left): {' '.join(command[1:])}")
    start = time.monotonic()
    # perf hints name what torch.compile could not put in a CUDA graph ("skipping cudagraphs due to ..."), which
    # would otherwise only show as a slower step
    environment = {"TORCH_LOGS": "perf_hints"} | os.environ | {"PYTHONUNBUFFERED": "1"}
    with open(out / "log.txt", "a") as handle:
        # a session of its own, so that the watchdog stops the compile workers it starts too
        process = subprocess.Popen(
            command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=environment, start_new_session=True
        )
        watchdog = threading.Timer(remaining, stop_group, (process,))  # fires even while the process prints nothing
        watchdog.start()
        try:
            for line in iter(process.stdout.readline, b""):
                text = line.decode(errors="replace")
                sys.stdout.write(text)
                handle.write(text)
                handle.flush()
            code = process.wait()
        finally:
            watchdog.cancel()
    stopped = time.monotonic() >= deadline and code != 0
    status = "stopped at the deadline" if stopped else f"exit {code}"
    log(out, f"== {name}: {status} after {time.monotonic() - start:.0f} s")
    return None if stopped else code


def stop_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def read_results(path: Path) -> dict:
    """A part's output, or the strategies it finished before it was stopped (its partial file)."""
    partial = partial_path(path)
    if path.is_file():
        return json.loads(path.read_text())
    return json.loads(partial.read_text()) if partial.is_file() else {}


def summary_rows(outputs: dict[str, dict]) -> list[dict]:
    """One row per strategy and engine, with the ratio to vanilla on the same engine."""
    rows = []
    for part, output in outputs.items():
        results = output.get("results", [])
        engine = (output.get("args") or {}).get("engine_resolved")
        vanilla = {result["strategy"]: result for result in results}.get("vanilla")
        for result in results:
            batches = result["batches"]
            steps = sum(batch.get("decode_steps_timed", 0) for batch in batches)
            decode = sum(batch.get("decode_s", 0.0) for batch in batches)
            if result["continuous"]:  # no batches: the iteration model's iterations over the whole run
                steps, decode = result["decode_steps"], result["generation_time_s"]
            rows.append(
                {
                    "part": part,
                    "engine": engine,
                    "strategy": result["strategy"],
                    "samples_per_s": result["throughput_samples_per_s"],
                    "x_vanilla_same_engine": result["throughput_samples_per_s"] / vanilla["throughput_samples_per_s"]
                    if vanilla
                    else None,
                    "decode_steps": result["decode_steps"],
                    "ms_per_decode_step": 1000 * decode / steps if steps else None,
                    "prefill_s": sum(batch.get("prefill_s", 0.0) for batch in batches),
                    "other_s": sum(batch.get("other_s", 0.0) for batch in batches),
                    "generation_s": result["generation_time_s"],
                    "warmup_s": result.get("engine_warmup_s", 0.0),
                    "average_length": result["average_length"],
                    "effective_token_ratio": result["effective_token_ratio"],
                    "slots": result.get("slots"),
                    "continuous_settings": result.get("continuous_settings"),
                }
            )
    return rows


def markdown_table(rows: list[dict]) -> str:
    def number(value, digits):
        return "-" if value is None else f"{value:.{digits}f}"

    lines = [
        "| engine | strategy | samples/s | x vanilla | decode steps | ms/step | prefill s | other s | warm-up s "
        "| avg length | effective |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        strategy = row["strategy"] + (f" ({row['slots']} slots)" if row["slots"] else "")
        lines.append(
            f"| {row['engine']} | {strategy} | {row['samples_per_s']:.3f} | {number(row['x_vanilla_same_engine'], 2)} "
            f"| {row['decode_steps']} | {number(row['ms_per_decode_step'], 1)} | {row['prefill_s']:.1f} "
            f"| {row['other_s']:.1f} | {row['warmup_s']:.1f} | {row['average_length']:.2f} "
            f"| {row['effective_token_ratio'] * 100:.2f} % |"
        )
    return "\n".join(lines)


def decode_step_command(args, out: Path) -> list[str]:
    command = [sys.executable, "-m", "benchmarks.decode_step", "--engines", *STEP_ENGINES]
    command += [
        "--model",
        args.model,
        "--load-format",
        args.load_format,
        "--device",
        args.device,
        "--dtype",
        args.dtype,
    ]
    command += ["--batch-size", str(args.batch_size), "--context", str(STEP_CONTEXT), "--steps", str(STEP_TOKENS)]
    return [*command, "--output-json", str(out / f"{STEP_PART}.json")]


def step_lines(step: dict, rows: int) -> str:
    """The step part's figures under the table: each engine's step and what compiling and capturing it cost."""
    lines = [
        f"\n\n{rows} rows, {STEP_CONTEXT}-token prompts, {STEP_TOKENS} tokens ({name}): "
        f"{result['clock_ms_per_step']:.2f} ms a step, {result['host_ms_per_step']:.2f} ms on the host; "
        f"compilation and CUDA graphs {result['warmup_s']:.1f} s"
        for name, result in step.items()
    ]
    return "".join(lines)


def static_strategies(args, out: Path) -> tuple[list[str], list[str]]:
    """The whole table's strategies, and the flags its predictor rows need."""
    statics = list(PLAIN_STRATEGIES)
    ready, reason = proxy_available(args.predictor_path)
    if ready:
        statics.append("proxy+vbs+fcr")
        predictor_flags = ["--predictor-path", args.predictor_path]
    else:
        predictor_flags = []
        log(out, f"{reason}: proxy+vbs+fcr is left out")
    if args.predictions_path:
        statics += ["file+vbs+fcr", "file+fcr+resume"]
        predictor_flags += ["--predictions-path", args.predictions_path]
    return statics, predictor_flags


def run_static_parts(args, out: Path, deadline: float) -> dict:
    """The static parts in order, each on its engine with the compared strategies (vanilla, gt+vbs+fcr) and every
    strategy of the table that no earlier part returned. The graph and then the compiled part also run unasked while
    some of the table is missing after the parts before them, so that a failing engine still leaves a whole table."""
    statics, predictor_flags = static_strategies(args, out)
    codes, returned = {}, set()
    for part, engine in STATIC_PARTS.items():
        missing = [strategy for strategy in statics if strategy not in returned]
        # after a last part that ended by itself (one skipped or stopped at the deadline leaves no time for another)
        ended = bool(codes) and list(codes.values())[-1] is not None
        fallback = part in FALLBACK_PARTS and ended and bool(missing)
        if part not in args.parts and not fallback:
            continue
        if fallback and part not in args.parts:
            log(out, f"the table misses {', '.join(missing)}: the {part} engine runs them")
        strategies = [strategy for strategy in statics if strategy in missing or strategy in COMPARED_STRATEGIES]
        flags = [*common_flags(args), "--engine", engine, "--strategies", *strategies]
        if any(strategy not in PLAIN_STRATEGIES for strategy in strategies):
            flags += predictor_flags
        codes[part] = run_part(out, part, flags, deadline)
        returned |= {result["strategy"] for result in read_results(out / f"{part}.json").get("results", [])}
    return codes


def run_continuous_part(args, out: Path, deadline: float) -> dict:
    """Continuous batching at the KV-cache memory of the largest static batch, at --continuous-speed; once more at
    the plain settings if that returned nothing."""
    outputs = [read_results(out / f"{part}.json") for part in STATIC_PARTS]
    results = [result for output in outputs for result in output.get("results", [])]
    longest_prompt = max((output.get("args") or {}).get("longest_prompt_tokens", 0) for output in outputs)
    slots = equal_memory_slots(results, longest_prompt, args.max_length, args.batch_size)
    log(out, f"continuous batching at the KV-cache memory of the largest static batch: {slots} slots")
    flags = [*common_flags(args), "--engine", "transformers", "--slots", str(slots)]
    flags += ["--strategies", "continuous", "continuous:gt"]
    codes = {
        CONTINUOUS_PART: run_part(out, CONTINUOUS_PART, [*flags, "--continuous-speed", args.continuous_speed], deadline)
    }
    failed = codes[CONTINUOUS_PART] not in (0, None) and not read_results(out / f"{CONTINUOUS_PART}.json")
    if failed and args.continuous_speed != "plain":
        log(out, f"continuous batching at speed {args.continuous_speed} returned nothing: once more at plain")
        plain = [*flags, "--continuous-speed", "plain"]
        codes[PLAIN_CONTINUOUS_PART] = run_part(out, PLAIN_CONTINUOUS_PART, plain, deadline)
    return codes


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in (*OUTPUT_PARTS, STEP_PART, "summary"):  # an earlier run's files would pass for this run's
        (out / f"{name}.json").unlink(missing_ok=True)
        partial_path(out / f"{name}.json").unlink(missing_ok=True)
    (out / "log.txt").unlink(missing_ok=True)
    (out / "table.md").unlink(missing_ok=True)
    deadline = time.monotonic() + args.budget_s
    codes = run_static_parts(args, out, deadline)
    if CONTINUOUS_PART in args.parts:
        codes |= run_continuous_part(args, out, deadline)
    if TRAIN_PART in args.parts:
        smoke = [sys.executable, "-m", "benchmarks.train_smoke", "--output-dir", str(out / TRAIN_PART)]
        smoke += ["--model", args.model, "--load-format", args.load_format]
        smoke += ["--budget-s", str(max(0.0, deadline - time.monotonic()))]
        codes[TRAIN_PART] = run_logged(out, TRAIN_PART, smoke, deadline)
    if STEP_PART in args.parts:
        codes[STEP_PART] = run_logged(out, STEP_PART, decode_step_command(args, out), deadline)
    outputs = {part: read_results(out / f"{part}.json") for part in OUTPUT_PARTS}
    rows = summary_rows({part: output for part, output in outputs.items() if output})
    compilation = {
        part: (output.get("args") or {}).get("engine_warmup_before_strategies_s") for part, output in outputs.items()
    }
    step = read_results(out / f"{STEP_PART}.json").get("results", {})
    summary = {"args": vars(args), "exit_codes": codes, "compilation_s": compilation, "rows": rows, "step": step}
    write_json_atomic(out / "summary.json", summary)
    table = markdown_table(rows) + step_lines(step, args.batch_size)
    write_text_atomic(out / "table.md", table + "\n")
    log(out, table)
    return 0 if all(code == 0 for code in codes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
