"""Fit the length predictor to your model: record your model's own answer lengths on a sample of your prompts, then
fine-tune the predictor that ships (trained on Vicuna-7B's lengths) on them.

    python -m src.fit_proxy --model smollm2-135m --input data/alpaca-train-10k.json --num-data 2000 \\
        --max-length 256 --output-dir ckpts/proxy-smollm2
    python -m src.infer --model smollm2-135m --predictor-path ckpts/proxy-smollm2 --input ... --output ...

Three steps, each resumable (run the same command again after an interruption):
1. draw `--num-data` requests of `--input` (any request file of src.infer; a seeded draw) into `WORK/requests.jsonl`;
2. answer them with `python -m src.infer` (scheduled by the predictor being fitted, which does not change greedy
   answers), appending to `WORK/answers.jsonl`: each answer's generated tokens are its length, capped at
   `--max-length` as when you serve it;
3. `python -m src.train_proxy --init_from PREDICTOR` on `WORK/train.json` and its length file: it prints the accuracy
   on the last `--holdout` requests before fine-tuning (the predictor as it ships) and after, and saves the fitted
   predictor in `--output-dir`.

WORK is `--output-dir` with `-work` added. Serve with the same `--max-length`, temperature and template, since the
predictor learns the lengths those give.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from .common.cli import MAX_SEED, HelpFormatter, check_output_dir, check_range, check_temperature, run_cli
from .common.data import PAPER_TRAIN_DATA, length_field
from .common.request_file import COMPLETIONS_ENDPOINT, check_request_file, read_requests
from .common.utils import UserError, write_json_atomic, write_text_atomic
from .predictors.proxy import CONFIG_NAME, SHIPPED_PROXY_PATH, proxy_available
from .running.setup import add_model_arguments, check_model_arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument(
        "--input", default=PAPER_TRAIN_DATA, help="your prompts, any request file of src.infer (default: %(default)s)"
    )
    parser.add_argument("--output-dir", required=True, help="where the fitted predictor goes")
    add_model_arguments(parser)
    parser.add_argument("--num-data", type=int, default=2000, help="requests drawn to record (default: %(default)s)")
    parser.add_argument(
        "--holdout", type=int, default=200, help="last drawn requests kept out of training (default: %(default)s)"
    )
    parser.add_argument("--max-length", type=int, default=512, help="most new tokens per answer (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.0, help="of the recorded answers (default: greedy)")
    parser.add_argument("--batch-size", type=int, default=16, help="requests generated together (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=42, help="seed of the draw and of sampling (default: %(default)s)")
    parser.add_argument(
        "--init-from", default=SHIPPED_PROXY_PATH, help="the predictor to fine-tune (default: %(default)s)"
    )
    parser.add_argument("--epochs", type=float, default=2, help="fine-tuning epochs (default: %(default)s)")
    parser.add_argument("--learning-rate", type=float, default=4e-5, help="fine-tuning rate (default: %(default)s)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a predictor already in --output-dir (else refused)"
    )
    args = parser.parse_args(argv)
    for flag, value in (("--num-data", args.num_data), ("--max-length", args.max_length)):
        check_range(flag, value, 1)
    check_range("--batch-size", args.batch_size, 1)
    check_range("--holdout", args.holdout, 1)
    check_temperature("--temperature", args.temperature)
    check_range("--seed", args.seed, 0, MAX_SEED)
    check_range("--epochs", args.epochs, 0, open_low=True)
    check_range("--learning-rate", args.learning_rate, 0, open_low=True)
    if args.holdout >= args.num_data:
        raise UserError(f"--holdout {args.holdout} leaves none of --num-data {args.num_data} to train on")
    check_model_arguments(args)
    check_output_dir("--output-dir", args.output_dir)
    if (Path(args.output_dir) / CONFIG_NAME).is_file() and not args.overwrite:
        raise UserError(f"{args.output_dir} holds a predictor: choose another --output-dir, or pass --overwrite")
    ready, reason = proxy_available(args.init_from)
    if not ready:
        raise UserError(f"--init-from: {reason}")
    return args


def work_dir(output_dir: str) -> Path:
    return Path(f"{str(output_dir).rstrip('/')}-work")


def draw_requests(args, path: Path) -> int:
    """The seeded draw of --num-data runnable requests of --input, written as FastChat conversations (JSON lines);
    an existing file of the same draw is kept, so a rerun resumes against the same ids."""
    import numpy as np

    check_request_file(args.input)
    runnable = [request for request in read_requests(args.input) if request.problem is None]
    completion = next((request for request in runnable if request.endpoint == COMPLETIONS_ENDPOINT), None)
    if completion is not None:  # the drawn requests are answered as chats: a completion's length would be another's
        raise UserError(
            f"{args.input}, line {completion.line}: fit_proxy records chat answers, and this is a /v1/completions "
            "line: give it as a chat line, or leave it out"
        )
    if len(runnable) < args.num_data:
        raise UserError(f"--num-data {args.num_data}: {args.input} has only {len(runnable)} requests that can run")
    order = np.random.default_rng(args.seed).permutation(len(runnable))[: args.num_data]
    speakers = {"user": "human", "assistant": "gpt", "system": "system"}
    lines = []
    for index in order:
        request = runnable[int(index)]
        turns = [{"from": speakers[role], "value": text} for role, text in request.messages]
        lines.append(json.dumps({"id": request.id, "conversations": turns}, ensure_ascii=False) + "\n")
    text = "".join(lines)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        write_text_atomic(path, text)
    return len(lines)


def run_module(module: str, argv: list[str]) -> None:
    """`python -m src.<module> ARGV` in a process of its own (its output goes straight to the terminal)."""
    print(f"\n== python -m src.{module} {' '.join(argv)}", flush=True)
    done = subprocess.run([sys.executable, "-m", f"src.{module}", *argv])
    if done.returncode != 0:
        raise UserError(f"python -m src.{module} stopped with exit status {done.returncode} (its output is above)")


def model_flags(args) -> list[str]:
    flags = ["--model", args.model, "--device", args.device, "--dtype", args.dtype, "--engine", args.engine]
    flags += ["--load-format", args.load_format]
    return flags + (["--conv-template", args.conv_template] if args.conv_template else [])


def write_training_files(answers: Path, requests: Path, data_path: Path) -> tuple[list[dict], str]:
    """The answered requests as a conversation file (the last user turn, what the predictor reads) and its length
    file (L_t<temperature>: generated tokens); requests that got an error line are left out."""
    from .common.answers import read_complete_lines
    from .common.data import default_length_path

    rows = {row["id"]: row for row in read_complete_lines(answers) if "error" not in row}
    conversations, lengths = [], []
    for request in read_requests(requests):
        if request.id in rows:
            conversations.append({"id": request.id, "conversations": [{"from": "human", "value": request.prompt}]})
            lengths.append({"id": request.id, "length": rows[request.id]["generated_tokens"]})
    write_json_atomic(data_path, conversations)
    return lengths, default_length_path(data_path)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    work = work_dir(args.output_dir)
    requests, answers, data_path = work / "requests.jsonl", work / "answers.jsonl", work / "train.json"
    drawn = draw_requests(args, requests)
    print(f"{drawn} requests of {args.input} drawn into {requests}")
    generation = ["--max-length", str(args.max_length), "--temperature", str(args.temperature)]
    generation += ["--batch-size", str(args.batch_size), "--seed", str(args.seed)]
    run_module(
        "infer",
        ["--input", str(requests), "--output", str(answers), *model_flags(args), *generation]
        + ["--strategy", "proxy+fcr+resume", "--predictor-path", args.init_from, "--redo-changed"],
    )
    lengths, length_path = write_training_files(answers, requests, data_path)
    field = length_field(args.temperature)
    write_json_atomic(length_path, [{"id": row["id"], field: row["length"]} for row in lengths])
    if len(lengths) <= args.holdout:
        raise UserError(f"only {len(lengths)} requests were answered: fewer than --holdout {args.holdout} + 1")
    print(f"{len(lengths)} recorded lengths in {length_path}")
    training = ["--init_from", args.init_from, "--data_path", str(data_path), "--length_path", str(length_path)]
    training += ["--holdout", str(args.holdout), "--output_dir", args.output_dir, "--seed", str(args.seed)]
    training += ["--num_train_epochs", str(args.epochs), "--learning_rate", str(args.learning_rate)]
    training += ["--overwrite", str(args.overwrite)]
    run_module("train_proxy", training)
    config = json.loads((Path(args.output_dir) / CONFIG_NAME).read_text())
    return {
        "recorded": len(lengths),
        "before": config.get("holdout_metrics_before"),
        "after": config.get("holdout_metrics"),
    }


if __name__ == "__main__":
    run_cli(main)
