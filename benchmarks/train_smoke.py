"""The length-perception training path end to end, briefly: `bash train.sh` for a few LoRA steps, the adapter saved and
loaded again by `src.eval --strategy seqsch` for one batch of predictions. On CUDA it runs the paper's preset on
Vicuna-7B's architecture with random bfloat16 weights, the part of the paper's pipeline that had never run on a GPU;
on a CPU, the cpu preset on any small model.

    python -m benchmarks.train_smoke --output-dir runs/train-smoke                  # CUDA: paper preset, 7B shape
    python -m benchmarks.train_smoke --preset cpu --model smollm2-135m --load-format auto --output-dir runs/smoke

Each step is a process whose output goes to `log.txt` as it comes; `summary.json` is rewritten after every step
(its command, exit status and seconds), so a run cut off by `--budget-s` or by the machine still says how far it got.
The predictions of random weights mean nothing: this measures that the path runs (and how long its steps take), not
what it learns.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmarks.gpu_table import log, run_logged
from src.common.utils import write_json_atomic


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/train-smoke")
    parser.add_argument("--preset", default="paper", choices=("paper", "cpu"), help="train.sh's preset")
    parser.add_argument("--model", default="vicuna-7b-shape", help="a model folder or alias")
    parser.add_argument("--load-format", default="dummy", choices=("auto", "dummy"), help="dummy: random weights")
    parser.add_argument("--data-path", default="data/alpaca-train-10k-instruct.json", help="train.sh's --data_path")
    parser.add_argument("--eval-data-path", default="data/alpaca-val-10k.json", help="src.eval's conversations")
    parser.add_argument("--num-data", type=int, default=64, help="training examples")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps (a checkpoint after half of them)")
    parser.add_argument("--eval-rows", type=int, default=16, help="rows src.eval predicts with the adapter")
    parser.add_argument("--max-length", type=int, default=512, help="src.eval's cap on a predicted length")
    parser.add_argument("--budget-s", type=float, default=480, help="no step starts, and none runs, past this")
    return parser.parse_args(argv)


def train_command(args, adapter: Path) -> list[str]:
    """The preset's own flags, shortened to a few steps of small batches on a slice of the data."""
    flags = ["--model_name_or_path", args.model, "--load_format", args.load_format, "--data_path", args.data_path]
    flags += ["--num_data", str(args.num_data), "--max_steps", str(args.steps), "--output_dir", str(adapter)]
    flags += ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--logging_steps", "1"]
    flags += ["--save_steps", str(max(1, args.steps // 2)), "--overwrite", "True"]
    return ["bash", "train.sh", args.preset, *flags]


def eval_command(args, adapter: Path, out: Path) -> list[str]:
    flags = ["--strategy", "seqsch", "--model", args.model, "--load-format", args.load_format]
    flags += ["--lora-path", str(adapter), "--data-path", args.eval_data_path, "--num-data", str(args.eval_rows)]
    flags += ["--prediction-batch-size", str(args.eval_rows), "--max-length", str(args.max_length)]
    flags += ["--output-json", str(out / "eval.json"), "--plot", str(out / "eval.png")]
    return [sys.executable, "-m", "src.eval", *flags]


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("summary.json", "eval.json", "log.txt"):  # an earlier run's files would pass for this run's
        (out / stale).unlink(missing_ok=True)
    deadline = time.monotonic() + args.budget_s
    adapter = out / "adapter"
    summary = {"args": vars(args), "steps": []}
    for name, command in (("train", train_command(args, adapter)), ("eval", eval_command(args, adapter, out))):
        start = time.monotonic()
        code = run_logged(out, name, command, deadline)
        summary["steps"].append(
            {"step": name, "command": command, "exit_code": code, "seconds": time.monotonic() - start}
        )
        write_json_atomic(out / "summary.json", summary)
        if code != 0:
            return 1
    adapter_files = sorted(path.name for path in adapter.iterdir() if path.is_file())
    evaluated = json.loads((out / "eval.json").read_text())
    summary["adapter_files"] = adapter_files
    summary["eval"] = {key: evaluated.get(key) for key in ("num_samples", "error", "unparsable", "seconds_per_1000")}
    write_json_atomic(out / "summary.json", summary)
    log(out, f"trained {args.steps} steps and predicted {args.eval_rows} rows with the adapter: {summary['eval']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
