"""The time of one decode step on each engine, in one process, on the same batch.

    python -m benchmarks.decode_step --model smollm2-135m --engines transformers compiled graph

Each engine generates `--steps` tokens for `--batch-size` random prompts of `--context` tokens, every row replayed to
the last step, so that no row ends early. The step time is the batch's decode time over its decode steps, as the
engine's step clock measured it (CUDA events on a GPU), and the host's view: the wall time after the first token
over the same steps. Each engine's shapes are compiled and warmed before its timed calls; the engines take turns, so
that a drift in the machine's load hits them alike, and the median of `--repeats` calls is reported.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from src.common.cli import check_range, run_cli
from src.common.models import load_model
from src.common.utils import write_json_atomic
from src.engines.registry import ENGINES, build_engine
from src.running.setup import add_model_arguments


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--engines", nargs="+", default=["transformers", "compiled", "graph"], choices=sorted(ENGINES))
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


def main(argv=None) -> dict:
    args = parse_args(argv)
    model, tokenizer, _ = load_model(args.model, args.device, args.dtype, None, args.load_format)
    vocabulary = model.config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(0)
    # prompts: [B, context] of ordinary tokens
    prompts = torch.randint(100, vocabulary, (args.batch_size, args.context), generator=generator).tolist()
    engines = {name: build_engine(name, model, tokenizer) for name in args.engines}
    for engine in engines.values():  # compiles and warms every shape the timed calls use
        engine.generate(prompts, args.steps, 0.0, [args.steps] * args.batch_size)
    calls = {name: [] for name in engines}
    for _ in range(args.repeats):
        for name, engine in engines.items():
            calls[name].append(time_one_call(engine, prompts, args.steps))
    results = {}
    print(f"{args.batch_size} rows x {args.context}-token prompts, {args.steps} tokens, on {model.device}")
    for name, timed in calls.items():
        results[name] = {key: statistics.median(call[key] for call in timed) for key in timed[0]}
        results[name]["warmup_s"] = engines[name].warmup_seconds
        print(
            f"{name:>12}: {results[name]['clock_ms_per_step']:.2f} ms a step (clock), "
            f"{results[name]['host_ms_per_step']:.2f} ms (host), warm-up {results[name]['warmup_s']:.1f} s"
        )
    summary = {"args": vars(args), "device": str(model.device), "results": results, "calls": calls}
    if args.output_json:
        write_json_atomic(args.output_json, summary)
    return summary


if __name__ == "__main__":
    run_cli(main)
