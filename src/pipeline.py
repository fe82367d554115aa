"""The paper's length-perception pipeline end to end, one command: the data, the model's own lengths, the
instruction set, the LoRA adapter, its accuracy, and a benchmark row scheduled by it.

    python -m src.pipeline                                           # CPU preset: SmolLM2-135M on a slice
    python -m src.pipeline --preset paper --model ./ckpts/vicuna-7b  # the paper's run, on a CUDA GPU

Steps, each a command of this project run in a process of its own (printed before it runs):
1. data: the first --train-rows and --val-rows of the paper's Alpaca split in data/ (src.sample made that split from
   Alpaca 52k; `python -m src.sample --source alpaca_data.json` makes it again);
2. src.lenpred: the model's own lengths on the train rows (at --temperatures);
3. src.construct: the instruction set (each prompt with the paper's query prompt, answered by the bucket of L_max);
4. bash train.sh: the LoRA adapter (its cpu or paper preset, on this instruction set);
5. src.lenpred: the model's own lengths on the val rows, the targets of the evaluation;
6. src.eval: Error, Acc-50, Acc-100 and Kendall's tau of seqsch (the adapter) and of the constant predictor (the
   train rows' median L_max) on the val rows;
7. src.benchmark: vanilla against seqsch+vbs+fcr, the model generating until it stops.

Everything goes under --output-dir. A step whose output is there is not run again, so the same command after an
interruption goes on where it stopped (lenpred and train.sh resume inside a step too); `pipeline.json` records each
step's command and seconds as it goes. The end prints the perception table and the benchmark rows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .common.cli import HelpFormatter, check_output_dir, check_range, run_cli
from .common.data import PAPER_TRAIN_DATA, PAPER_VAL_DATA, load_max_lengths
from .common.models import check_model_name
from .common.utils import UserError, read_json, write_json_atomic


@dataclass(frozen=True)
class Preset:
    model: str
    train_rows: int | None  # first rows of the paper's train file; None: all of them
    val_rows: int  # first rows of the paper's val file: evaluated, and served by the benchmark
    max_length: int
    temperatures: tuple[float, ...]
    train_preset: str  # train.sh's
    epochs: float
    benchmark_draw: int | None  # None: serve the val rows; N: the paper's seeded draw of N from the whole val file


PRESETS = {
    # Under 20 minutes on 2 CPU cores (192 and 96 rows took 21 min 52 s). A cap of 128 new tokens keeps SmolLM2's
    # looping answers cheap; greedy lengths only (one sampled answer is too noisy a target for a few hundred
    # examples, docs/PERCEPTION.md).
    "cpu": Preset("smollm2-135m", 160, 64, 128, (0.0,), "cpu", 2, None),
    # The paper: all 10k train prompts at four temperatures, max 512, 3 epochs; the first 1000 val rows evaluated;
    # its draw of 1024 val prompts served (src.benchmark --num-data 1024)
    "paper": Preset("./ckpts/vicuna-7b", None, 1000, 512, (0.0, 0.3, 0.5, 0.7), "paper", 3, 1024),
}


# What the outputs depend on: a rerun in the same folder must not mix another run's steps into this one's.
SETTINGS = ("preset", "model", "dtype", "train_rows", "val_rows", "max_length", "epochs")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="the settings below start from it")
    parser.add_argument("--model", default=None, help="the served model (default: the preset's)")
    parser.add_argument("--device", default="auto", help="as src.benchmark's")
    parser.add_argument("--dtype", default="auto", help="as src.benchmark's")
    parser.add_argument("--train-rows", type=int, default=None, help="first rows of the train file (default: preset's)")
    parser.add_argument("--val-rows", type=int, default=None, help="first rows of the val file (default: preset's)")
    parser.add_argument("--max-length", type=int, default=None, help="new tokens at most (default: the preset's)")
    parser.add_argument("--epochs", type=float, default=None, help="training epochs (default: the preset's)")
    parser.add_argument("--output-dir", default=None, help="default: runs/pipeline-<preset>")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    args.model = args.model or preset.model
    args.train_rows = args.train_rows or preset.train_rows
    args.val_rows = args.val_rows or preset.val_rows
    args.max_length = args.max_length or preset.max_length
    args.epochs = args.epochs or preset.epochs
    args.output_dir = args.output_dir or f"runs/pipeline-{args.preset}"
    for flag, value in (("--train-rows", args.train_rows), ("--val-rows", args.val_rows)):
        check_range(flag, value, 1)
    check_range("--max-length", args.max_length, 1)
    check_range("--epochs", args.epochs, 0, open_low=True)
    check_model_name("--model", args.model)
    check_output_dir("--output-dir", args.output_dir)
    return args


def model_flags(args) -> list[str]:
    return ["--model", args.model, "--device", args.device, "--dtype", args.dtype]


def steps(args, preset: Preset, work: Path) -> list[tuple[str, Path, list[str]]]:
    """(name, the output whose presence means done, command) in order."""
    temperatures = [f"{temperature:g}" for temperature in preset.temperatures]
    lengths = ["--max-length", str(args.max_length), "--temperatures", *temperatures]
    common_eval = [*model_flags(args), "--data-path", str(work / "val.json"), "--num-data", str(args.val_rows)]
    common_eval += ["--length-path", str(work / "val-length.json"), "--max-length", str(args.max_length)]
    served = ["--data-path", str(work / "val.json")]
    if preset.benchmark_draw:
        served = ["--data-path", PAPER_VAL_DATA, "--num-data", str(preset.benchmark_draw)]
    python = [sys.executable, "-m"]
    return [
        (
            "the model's lengths on the train rows",
            work / "train-length.json",
            [*python, "src.lenpred", *model_flags(args), "--data-path", str(work / "train.json"), *lengths],
        ),
        (
            "the instruction set",
            work / "train-instruct.json",
            [*python, "src.construct", "--data-path", str(work / "train.json")],
        ),
        (
            "the LoRA adapter",
            work / "adapter" / "length_perception_args.json",
            ["bash", "train.sh", preset.train_preset, "--model_name_or_path", args.model]
            + ["--data_path", str(work / "train-instruct.json"), "--output_dir", str(work / "adapter")]
            + ["--num_train_epochs", f"{args.epochs:g}"]
            + (["--num_data", str(args.train_rows)] if args.train_rows else []),
        ),
        (
            "the model's lengths on the val rows",
            work / "val-length.json",
            [*python, "src.lenpred", *model_flags(args), "--data-path", str(work / "val.json"), *lengths],
        ),
        (
            "seqsch's accuracy",
            work / "eval-seqsch.json",
            [*python, "src.eval", "--strategy", "seqsch", "--lora-path", str(work / "adapter"), *common_eval]
            + ["--output-json", str(work / "eval-seqsch.json"), "--plot", str(work / "eval-seqsch.png")],
        ),
        (
            "the constant predictor's accuracy",
            work / "eval-constant.json",
            [*python, "src.eval", "--strategy", "constant", *common_eval]
            + ["--constant-length", "{median}", "--output-json", str(work / "eval-constant.json")]
            + ["--plot", str(work / "eval-constant.png")],
        ),
        (
            "the benchmark",
            work / "benchmark.json",
            [*python, "src.benchmark", *model_flags(args), *served]
            + ["--max-length", str(args.max_length), "--strategies", "vanilla", "seqsch+vbs+fcr"]
            + ["--lora-path", str(work / "adapter"), "--output-json", str(work / "benchmark.json")],
        ),
    ]


def write_slices(args, work: Path) -> None:
    """The first rows of the paper's split: written once, so that a rerun serves the very same rows."""
    for name, source, rows in (("train", PAPER_TRAIN_DATA, args.train_rows), ("val", PAPER_VAL_DATA, args.val_rows)):
        target = work / f"{name}.json"
        if not target.exists():
            write_json_atomic(target, read_json(source, "the paper's data")[:rows])


def train_median(work: Path) -> int:
    return max(1, round(statistics.median(load_max_lengths(work / "train-length.json").values())))


def perception_table(work: Path) -> str:
    lines = ["| predictor | Error (tokens) | Acc-50 | Acc-100 | Kendall's tau |", "| --- | ---: | ---: | ---: | ---: |"]
    for name, label in (("constant", "constant (the train median)"), ("seqsch", "seqsch (the LoRA adapter)")):
        metrics = read_json(work / f"eval-{name}.json", "evaluation")
        lines.append(
            f"| {label} | {metrics['error']:.1f} | {metrics['acc_50'] * 100:.1f} % | {metrics['acc_100'] * 100:.1f} % "
            f"| {metrics['kendall_tau']:.3f} |"
        )
    return "\n".join(lines)


def benchmark_table(work: Path) -> str:
    results = read_json(work / "benchmark.json", "benchmark output")["results"]
    vanilla = results[0]["throughput_samples_per_s"]
    lines = ["| strategy | samples/s | speed-up | average length | effective token ratio | failure ratio |"]
    lines.append("| --- | ---: | ---: | ---: | ---: | ---: |")
    for result in results:
        lines.append(
            f"| {result['strategy']} | {result['throughput_samples_per_s']:.3f} | "
            f"{result['throughput_samples_per_s'] / vanilla:.2f}x | {result['average_length']:.2f} | "
            f"{result['effective_token_ratio'] * 100:.1f} % | {result['failure_ratio'] * 100:.1f} % |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    preset = PRESETS[args.preset]
    work = Path(args.output_dir)
    work.mkdir(parents=True, exist_ok=True)
    log_path = work / "pipeline.json"
    log = read_json(log_path, "pipeline log") if log_path.exists() else {"steps": {}}
    earlier = {key: log.get("args", {}).get(key) for key in SETTINGS}
    if log.get("args") and earlier != {key: getattr(args, key) for key in SETTINGS}:
        raise UserError(
            f"{work} holds a pipeline run with other settings ({json.dumps(earlier)}): choose another --output-dir"
        )
    log["args"] = vars(args)
    write_slices(args, work)
    planned = steps(args, preset, work)
    started = time.perf_counter()
    for number, (name, done, command) in enumerate(planned, 1):
        if done.exists():
            print(f"== {number}/{len(planned)} {name}: done before ({done})", flush=True)
            continue
        if "{median}" in command:  # known once the train lengths are
            command = [str(train_median(work)) if word == "{median}" else word for word in command]
        print(f"\n== {number}/{len(planned)} {name}: {' '.join(command)}", flush=True)
        step_started = time.perf_counter()
        finished = subprocess.run(command)
        if finished.returncode != 0:
            raise UserError(
                f"step {number} ({name}) stopped with exit status {finished.returncode} (its output is above); "
                "the same command goes on from it"
            )
        log["steps"][name] = {"command": command, "seconds": time.perf_counter() - step_started}
        write_json_atomic(log_path, log)
    log["seconds_this_run"] = time.perf_counter() - started
    write_json_atomic(log_path, log)
    print(f"\nLength perception on the first {args.val_rows} val rows ({args.model}):")
    print(perception_table(work))
    served = f"the paper's draw of {preset.benchmark_draw}" if preset.benchmark_draw else f"the {args.val_rows}"
    print(f"\nServing {served} val rows, max {args.max_length} new tokens:")
    print(benchmark_table(work))
    seconds = {name: round(step["seconds"]) for name, step in log["steps"].items()}
    print(f"\nSeconds per step: {json.dumps(seconds)}; this run {log['seconds_this_run']:.0f} s")
    return log


if __name__ == "__main__":
    run_cli(main)
