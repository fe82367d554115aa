"""The engine's cost over a bare `model.generate` call on the same batch.

    python -m benchmarks.engine_overhead --model smollm2-135m --steps 128

Both sides decode the same batch of prompts for exactly `--steps` steps: the engine (`--engine`, auto: eager on a
CPU) through its `generate` with replayed lengths (the longest row ends at `--steps`) and its step clock, the bare
call through `model.generate(min_new_tokens=max_new_tokens=steps)`. Prints token slots per second for each and the
ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from src.common.cli import run_cli
from src.common.data import load_conversations, select_samples
from src.common.models import load_model_and_formatter
from src.common.utils import synchronize, write_json_atomic
from src.engines.generate import left_pad
from src.engines.registry import build_engine
from src.running.setup import add_model_arguments


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--data-path", default="data/demo.json", help="prompts to batch")
    parser.add_argument("--batch-size", type=int, default=16, help="rows in the batch")
    parser.add_argument("--steps", type=int, default=128, help="decode steps per call")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per side (median reported)")
    parser.add_argument("--output-json", default=None, help="write the figures and arguments here")
    args = parser.parse_args(argv)

    model, tokenizer, formatter, path = load_model_and_formatter(
        args.model, args.device, args.dtype, None, args.load_format, args.conv_template
    )
    device = str(model.device)
    samples = select_samples(load_conversations(args.data_path), args.batch_size, 42)
    prompts = [formatter.encode(sample.prompt) for sample in samples]
    # lengths spread up to `steps`, so the engine's replay processor does real work on every step
    replay = [args.steps - (index * args.steps) // (2 * len(prompts)) for index in range(len(prompts))]

    chosen = build_engine(args.engine, model, tokenizer)

    def engine():
        chosen.generate(prompts, args.steps, 0.0, replay)

    def bare():
        input_ids, attention_mask = left_pad(prompts, tokenizer.pad_token_id, model.device)  # [B, S]
        with torch.inference_mode():
            model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                do_sample=False,
                max_new_tokens=args.steps,
                min_new_tokens=args.steps,
                pad_token_id=tokenizer.pad_token_id,
            )

    def timed(function):
        synchronize(device)
        start = time.perf_counter()
        function()
        synchronize(device)
        return time.perf_counter() - start

    engine(), bare()  # warm-up
    engine_times, bare_times = [], []
    for _ in range(args.repeats):  # interleaved, so drifts in machine load hit both sides alike
        engine_times.append(timed(engine))
        bare_times.append(timed(bare))
    slots = args.steps * len(prompts)
    engine_rate = slots / statistics.median(engine_times)
    bare_rate = slots / statistics.median(bare_times)
    print(f"batch: {len(prompts)} prompts x {args.steps} steps on {device}")
    print(f"bare model.generate: {bare_rate:.1f} token slots/s (median of {args.repeats})")
    print(f"engine {chosen.name}: {engine_rate:.1f} token slots/s (median of {args.repeats})")
    print(f"engine / bare: {engine_rate / bare_rate:.3f}x")
    if args.output_json:
        write_json_atomic(
            args.output_json,
            {
                "args": vars(args),
                "engine_token_slots_per_s": engine_rate,
                "bare_token_slots_per_s": bare_rate,
                "engine_times_s": engine_times,
                "bare_times_s": bare_times,
            },
        )


if __name__ == "__main__":
    run_cli(main)
