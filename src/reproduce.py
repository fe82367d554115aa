"""Regenerate the result tables and figures of README and docs/ from the clone alone.

    python -m src.reproduce                  # dry: the paper's setting without a model, in seconds
    python -m src.reproduce cpu --quick      # SmolLM2-135M on the CPU, a few minutes
    python -m src.reproduce cpu              # docs/CPU.md's table (42 minutes on 2 cores)
    python -m src.reproduce gpu              # Vicuna-7B's architecture, random float16 weights, on CUDA
    python -m src.reproduce proxy dry --predictor-path ckpts/proxy-minilm   # train a proxy first, then the dry run

Each part runs `src.benchmark` with the arguments docs/ prints, writes `runs/<part>.json` (its --output-json)
and `imgs/<prefix>-*.png`, and prints its table. The run ends with the side-by-side table of README: the
paper's figures against every part whose results are in `runs/`, from this run or an earlier one.

Every sample replays the length Vicuna-7B produced at temperature 0 (`L_t0.0` of the paper's val length file):
a logits processor ends it exactly there, so any model, even random weights, serves the paper's length
distribution. The proxy rows use the predictor that ships (`predictors/proxy-vicuna-7b`), or `--predictor-path`
(part `proxy` trains one into that path when it holds none); without one they are left out, with a note.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .common.cli import HelpFormatter, check_output_dir, run_cli
from .common.data import PAPER_TRAIN_DATA, PAPER_VAL_DATA, default_length_path
from .common.utils import UserError, cpu_has_bf16_instructions, read_json
from .predictors.proxy import SHIPPED_PROXY_PATH
from .running.paper_table import side_by_side_table

DATA = PAPER_VAL_DATA
LENGTHS = default_length_path(PAPER_VAL_DATA)
RUNS = Path("runs")
IMAGES = Path("imgs")


@dataclass(frozen=True)
class Part:
    name: str
    plot_prefix: str
    arguments: tuple[str, ...]
    strategies: tuple[str, ...]
    proxy_strategies: tuple[str, ...] = ()  # added when the proxy predictor is present
    needs_cuda: bool = False


REPLAY = ("--replay-lengths", LENGTHS, "--replay-field", "L_t0.0")
PARTS = {
    "dry": Part(
        "dry",
        "dry-run-paper",
        ("--dry-run", "--data-path", DATA, *REPLAY, "--num-data", "1024"),
        ("vanilla", "gt", "gt+vbs+fcr", "continuous", "continuous:gt"),
        ("proxy+vbs+fcr", "proxy+fcr+resume", "continuous:proxy"),
    ),
    "cpu": Part(
        "cpu",
        "cpu-smollm2",
        # the transformers engine, as when README's CPU column was measured: its continuous row is transformers'
        # manager (the slots engine, --engine auto on a CPU, is measured by benchmarks.infer_speed real)
        ("--model", "smollm2-135m", "--device", "cpu", "--engine", "transformers", "--data-path", DATA, *REPLAY)
        + ("--num-data", "256"),
        ("vanilla", "gt", "gt+vbs+fcr", "continuous"),
        ("proxy+vbs+fcr", "proxy+fcr+resume", "continuous:proxy"),
    ),
    # The Quickstart's run: 96 samples (one group), batches of 16, vanilla against sorted by the oracle. bfloat16,
    # because on a CPU with bf16 instructions (avx512_bf16 or AMX) SmolLM2 decodes 2.4 times faster than in float32;
    # replayed lengths make the token columns independent of the dtype.
    "cpu-quick": Part(
        "cpu-quick",
        "cpu-quick",
        ("--model", "smollm2-135m", "--device", "cpu", "--dtype", "bfloat16", "--data-path", DATA, *REPLAY)
        + ("--num-data", "96"),
        ("vanilla", "gt"),
    ),
    "gpu": Part(
        "gpu",
        "gpu-vicuna7b-shape",
        ("--model", "vicuna-7b-shape", "--load-format", "dummy", "--device", "cuda", "--data-path", DATA, *REPLAY)
        + ("--num-data", "256"),
        ("vanilla", "gt", "gt+vbs+fcr", "continuous"),
        ("proxy+vbs+fcr", "proxy+fcr+resume"),
        needs_cuda=True,
    ),
}
PART_ORDER = ("proxy", "dry", "cpu", "cpu-quick", "gpu", "pipeline")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument(
        "parts",
        nargs="*",
        default=["dry"],
        help="any of proxy, dry, cpu, gpu, all (proxy if missing, dry, cpu, gpu if CUDA is present), pipeline (the "
        "paper's length-perception pipeline on SmolLM2: python -m src.pipeline); default dry",
    )
    parser.add_argument(
        "--quick", action="store_true", help="cpu: the Quickstart's 96 samples in bfloat16, vanilla and gt (3 minutes)"
    )
    parser.add_argument("--strategies", nargs="+", default=None, help="run these instead of each part's own strategies")
    parser.add_argument(
        "--predictor-path",
        default=SHIPPED_PROXY_PATH,
        help="the proxy predictor of the proxy rows (part proxy trains one into ckpts/proxy-minilm: pass that path)",
    )
    parser.add_argument("--runs-dir", default=str(RUNS), help="where each part's benchmark JSON goes")
    parser.add_argument("--images-dir", default=str(IMAGES), help="where the figures go")
    parser.add_argument("--table-only", action="store_true", help="run nothing: print the side-by-side table")
    args = parser.parse_args(argv)
    unknown = [part for part in args.parts if part not in ("proxy", "dry", "cpu", "gpu", "all", "pipeline")]
    if unknown:
        raise UserError(f"unknown part {unknown[0]!r}: use proxy, dry, cpu, gpu, all or pipeline")
    check_output_dir("--runs-dir", args.runs_dir)
    check_output_dir("--images-dir", args.images_dir)
    return args


def cuda_present() -> bool:
    import torch

    return torch.cuda.is_available()


def proxy_present(path: str) -> bool:
    return (Path(path) / "proxy_config.json").is_file()


def train_proxy(path: str) -> None:
    """The proxy of docs/PERCEPTION.md: all-MiniLM-L6-v2, train_proxy's defaults, on the paper's train file."""
    if proxy_present(path):
        print(f"proxy: {path} is there already (delete it to train again)")
        return
    from .predictors.proxy import resolve_encoder

    resolve_encoder("minilm")  # a missing encoder package is a one-line error before anything runs
    print(f"proxy: training {path} on {PAPER_TRAIN_DATA} (7.5 to 12 min on 2 CPU cores in the runs recorded)")
    run_module("train_proxy", ["--data_path", PAPER_TRAIN_DATA, "--output_dir", path])


def run_module(module: str, argv: list[str]) -> None:
    """`python -m src.<module> ARGV`, as docs/ prints it, in a process of its own; a failure stops this command."""
    done = subprocess.run([sys.executable, "-m", f"src.{module}", *argv])
    if done.returncode != 0:
        raise UserError(f"python -m src.{module} stopped with exit status {done.returncode} (its output is above)")


def run_part(part: Part, args: argparse.Namespace) -> Path:
    strategies = list(args.strategies or part.strategies)
    arguments = list(part.arguments)
    if "bfloat16" in arguments and cpu_has_bf16_instructions() is False:
        arguments[arguments.index("bfloat16")] = "float32"  # emulated bfloat16 would be slower than float32
        print(f"{part.name}: this CPU has no bfloat16 instructions, so float32 (about 2.4 times the time)")
    extra = []
    if args.strategies is None and part.proxy_strategies:
        if proxy_present(args.predictor_path):
            strategies += part.proxy_strategies
        else:
            print(
                f"{part.name}: no proxy predictor in {args.predictor_path}, so no proxy rows "
                "(python -m src.reproduce proxy trains it)"
            )
    if any(strategy.split("+")[0].split(":")[-1] == "proxy" for strategy in strategies):
        extra = ["--predictor-path", args.predictor_path]
    output = Path(args.runs_dir) / f"{part.name}.json"
    argv = [*arguments, "--strategies", *strategies, *extra, "--output-json", str(output)]
    print(f"\n== {part.name}: python -m src.benchmark {' '.join(argv)}", flush=True)
    run_module("benchmark", argv)
    images_dir = args.images_dir
    if Path(images_dir) == IMAGES and not set(part.strategies) | set(part.proxy_strategies) <= set(strategies):
        # imgs/ holds the figures that docs/ shows, of every strategy of the part: a smaller run draws elsewhere
        images_dir = str(Path(args.runs_dir) / "imgs")
        print(f"{part.name}: not every strategy of the part ran, so its figures go to {images_dir}, not {IMAGES}")
    run_module("plots", ["--input", str(output), "--output-dir", images_dir, "--prefix", part.plot_prefix])
    print()
    print(part_table(read_json(output, "benchmark output")))
    return output


def part_table(output: dict) -> str:
    """A part's table as docs/ shows it, in Markdown."""
    results = output["results"]
    dry = results[0]["dry_run"]
    unit = "steps" if dry else "s"
    baseline = next((result for result in results if result["strategy"] == "vanilla"), None)
    lines = [
        f"| strategy |{'' if dry else ' samples/s |'} average length | effective token ratio | failure ratio | "
        f"mean / p90 latency ({unit}) |{'' if dry else ' speed-up |'}",
        "| --- |" + ("" if dry else " ---: |") + " ---: | ---: | ---: | ---: |" + ("" if dry else " ---: |"),
    ]
    for result in results:
        cells = [result["strategy"]]
        if not dry:
            cells.append(f"{result['throughput_samples_per_s']:.3f}")
        cells += [
            f"{result['average_length']:.2f}",
            f"{result['effective_token_ratio'] * 100:.2f} %",
            f"{result['failure_ratio'] * 100:.2f} %",
            f"{result[f'mean_latency_{unit}']:.1f} / {result[f'p90_latency_{unit}']:.1f}",
        ]
        if not dry:
            speedup = result["throughput_samples_per_s"] / baseline["throughput_samples_per_s"] if baseline else None
            cells.append(f"{speedup:.2f}x" if speedup else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, dict]:
    args = parse_args(argv)
    parts = set(args.parts)
    if "all" in parts:
        parts = {"proxy", "dry", "cpu"} | ({"gpu"} if cuda_present() else set())
    if args.quick:
        if "cpu" not in parts:
            raise UserError("--quick shortens part cpu: python -m src.reproduce cpu --quick")
        parts = parts - {"cpu"} | {"cpu-quick"}
    parts = [part for part in PART_ORDER if part in parts]  # the proxy first, so that the other parts have its rows
    needs_cuda = [part for part in parts if part in PARTS and PARTS[part].needs_cuda]
    if needs_cuda and not args.table_only and not cuda_present():
        raise UserError(f"part {needs_cuda[0]} needs a CUDA GPU, and torch sees none here: run dry or cpu")
    if not args.table_only:
        for part in parts:
            if part == "proxy":
                train_proxy(args.predictor_path)
            elif part == "pipeline":
                run_module("pipeline", ["--output-dir", str(Path(args.runs_dir) / "pipeline-cpu")])
            else:
                run_part(PARTS[part], args)
    paths = {name: Path(args.runs_dir) / f"{name}.json" for name in PARTS}
    outputs = {name: read_json(path, "benchmark output") for name, path in paths.items() if path.is_file()}
    if not outputs:
        print(f"no results in {args.runs_dir} yet: run a part, e.g. python -m src.reproduce dry")
    else:
        print(
            "\nThe paper against this project: samples/s (x vanilla), token slots per sample, effective token ratio "
            "(the dry run has no clock), from " + ", ".join(str(paths[name]) for name in outputs)
        )
        print("\n".join(side_by_side_table(outputs)))
    return outputs


if __name__ == "__main__":
    run_cli(main)
