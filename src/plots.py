"""Figures from a benchmark's `--output-json`: what each strategy achieves, and where static batches waste slots.

python -m src.plots --input runs/cpu.json --output-dir imgs --prefix cpu
-> imgs/cpu-strategies.png   throughput, effective token ratio and latency per strategy
   imgs/cpu-batches.png      batch by batch, useful against wasted token slots (vanilla vs one scheduled)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .common.cli import HelpFormatter, check_output_dir, run_cli
from .common.figures import plot_batches, plot_strategies
from .common.utils import UserError, read_json


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--input", required=True, help="a benchmark --output-json file")
    parser.add_argument("--output-dir", default="imgs", help="where the PNG files go")
    parser.add_argument("--prefix", default="benchmark", help="file names start with this")
    parser.add_argument("--scheduled", default=None, help="the strategy set against vanilla in the batch plot")
    args = parser.parse_args(argv)
    check_output_dir("--output-dir", args.output_dir)
    return args


def main(argv: list[str] | None = None) -> list[Path]:
    args = parse_args(argv)
    output = read_json(args.input, "benchmark output", "pass a file written by src.benchmark --output-json")
    results = output.get("results") if isinstance(output, dict) else None
    if not results or not all(isinstance(result, dict) and "strategy" in result for result in results):
        raise UserError(f"{args.input} holds no benchmark results: pass a file written by src.benchmark --output-json")
    for result in results:  # what the figures read; a result from another tool or an older version may lack some
        unit = "steps" if result.get("dry_run") else "s"
        needed = ["dry_run", "effective_token_ratio", "batches", f"mean_latency_{unit}", f"p90_latency_{unit}"]
        needed += [] if result.get("dry_run") else ["throughput_samples_per_s"]
        missing = [name for name in needed if name not in result]
        if missing:
            raise UserError(
                f"{args.input}: result {result['strategy']!r} lacks {', '.join(missing)}; "
                "run src.benchmark --output-json again to make a complete file"
            )
    written = [plot_strategies(results, Path(args.output_dir) / f"{args.prefix}-strategies.png")]
    if any(result["strategy"] == "vanilla" and result["batches"] for result in results):
        written.append(plot_batches(results, Path(args.output_dir) / f"{args.prefix}-batches.png", args.scheduled))
    for path in written:
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    run_cli(main)
