"""The time of one decode step on each engine, in one process, on the same batch.

    python -m benchmarks.decode_step --model smollm2-135m --engines transformers compiled graph captured

Each engine generates `--steps` tokens for `--batch-size` random prompts of `--context` tokens, every row replayed to
the last step, so that no row ends early. The step time is the batch's decode time over its decode steps, as the
engine's step clock measured it (CUDA events on a GPU), and the host's view: the wall time after the first token
over the same steps. Each engine's shapes are compiled and warmed before its timed calls (`warmup_s`: its compilation
and CUDA graphs), and it is timed once before the next engine is built; then the engines take turns, so that a drift
in the machine's load hits them alike, and the median of `--repeats` calls is reported. `--output-json` is rewritten
after each engine's first call and after each round.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from src.common.cli import check_range, run_cli
from src.common.models import load_model
from src.common.utils import write_json_atomic
from src.engines.registry import build_engine, engine_names
from src.running.setup import add_model_arguments


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument(
        "--engines", nargs="+", default=["transformers", "compiled", "graph", "captured"], choices=engine_names()
    )
    parser.add_argument("--batch-size", type=int, default=16, help="rows in the batch")
    parser.add_argument("--context", type=int, default=256, help="prompt tokens per row")
    parser.add_argument("--steps", type=int, default=64, help="tokens generated per call")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per engine (median reported)")
    parser.add_argument("--output-json", default=None, help="write the figures and arguments here")
    args = parser.parse_args(argv)
    check_range("--steps", args.steps, 2)  # a step time needs a decode step after the first token
    check_range("--batch-size", args.batch_size, 1)
    check_range("--context", args.context, 1)
    check_range("--repeats", args.repeats, 1)
    return args


def time_one_call(engine, prompts: list[list[int]], steps: int) -> dict:
    engine.generate(prompts, steps, 0.0, [steps] * len(prompts))
    timing = engine.last_timing
    return {
        "clock_ms_per_step": 1000 * timing.decode_s / timing.decode_steps,
        "host_ms_per_step": 1000 * (timing.wall_s - timing.prefill_s) / timing.decode_steps,
    }


def medians(calls: dict[str, list[dict]], engines: dict) -> dict:
    results = {}
    for name, timed in calls.items():
        results[name] = {key: statistics.median(call[key] for call in timed) for key in timed[0]}
        results[name] |= {"timed_calls": len(timed), "warmup_s": engines[name].warmup_seconds}
    return results


def main(argv=None) -> dict:
    args = parse_args(argv)
    model, tokenizer, _ = load_model(args.model, args.device, args.dtype, None, args.load_format)
    vocabulary = model.config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(0)
    # prompts: [B, context] of ordinary tokens
    prompts = torch.randint(100, vocabulary, (args.batch_size, args.context), generator=generator).tolist()
    print(f"{args.batch_size} rows x {args.context}-token prompts, {args.steps} tokens, on {model.device}")
    engines, calls = {}, {}
    summary = {"args": vars(args), "device": str(model.device), "results": {}, "calls": calls}

    def record() -> None:  # after every engine's first call and every round, so that a stopped run keeps its figures
        summary["results"] = medians(calls, engines)
        if args.output_json:
            write_json_atomic(args.output_json, summary)

    # each engine compiled and warmed on every shape its timed calls use (warmup_s), then timed once, so that an
    # engine that compiles long leaves the ones before it measured
    for name in args.engines:
        engines[name] = build_engine(name, model, tokenizer)
        engines[name].generate(prompts, args.steps, 0.0, [args.steps] * args.batch_size)
        calls[name] = [time_one_call(engines[name], prompts, args.steps)]
        record()
    for _ in range(args.repeats - 1):  # the engines take turns, so that a drift in the machine's load hits them alike
        for name, engine in engines.items():
            calls[name].append(time_one_call(engine, prompts, args.steps))
        record()
    for name, result in summary["results"].items():
        print(
            f"{name:>12}: {result['clock_ms_per_step']:.2f} ms a step (clock), "
            f"{result['host_ms_per_step']:.2f} ms (host), warm-up {result['warmup_s']:.1f} s"
        )
    return summary


if __name__ == "__main__":
    run_cli(main)
