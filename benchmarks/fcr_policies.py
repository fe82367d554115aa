"""Choose how FCR uses a predictor's quantiles, on rows the predictor never trained on: every combination of first
cap, VBS, resuming failures and retry quantiles, in the dry run (each sample ends at its recorded length; no model).

    python -m benchmarks.fcr_policies --predictor-path ckpts/proxy-minilm                # train_proxy's held-out rows
    python -m benchmarks.fcr_policies --predictor-path ckpts/proxy-minilm \\
        --data-path data/alpaca-val-10k.json --num-data 1024                              # the paper's val draw

By default the rows are the last 1000 of the training file, the ones `train_proxy --holdout 1000` keeps out of
training, so a policy is chosen without looking at val. The predictor runs once; each policy is a schedule over its
predictions (the same `run_schedule` and metrics as `src.benchmark --dry-run`). Prints a line per policy (token slots
per sample, effective token ratio, samples retried, tokens prefilled again per sample) and writes them with the
arguments to --output-json.
"""

from __future__ import annotations

import argparse
import itertools

from src.common.cli import check_output_file, check_range, run_cli
from src.common.data import (
    PAPER_TRAIN_DATA,
    default_length_path,
    load_conversations,
    load_length_file,
    require_ids,
    select_samples,
)
from src.common.utils import UserError, write_json_atomic
from src.predictors.flags import add_predictor_arguments, check_predictor_arguments, predictor_context
from src.predictors.registry import build_predictor
from src.scheduling.batches import ScheduleConfig
from src.scheduling.metrics import compute_metrics
from src.scheduling.schedule import replay_executor, run_schedule

DEFAULT_RETRY_POLICIES = ("none", "0.8", "0.9", "0.95", "0.8,0.95", "0.7,0.9", "0.6,0.8,0.95", "0.7,0.8,0.9,0.95")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-path", default=PAPER_TRAIN_DATA, help="FastChat conversation file")
    parser.add_argument("--length-path", default=None, help="its length file; default: data path + -length")
    parser.add_argument("--replay-field", default="L_t0.0", help="the length each sample ends at")
    rows = parser.add_mutually_exclusive_group()
    rows.add_argument("--last", type=int, default=None, help="the file's last N rows (default 1000 without --num-data)")
    rows.add_argument("--num-data", type=int, default=None, help="draw N rows as upstream (seed 42), as src.benchmark")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--group-size", type=int, default=256)
    parser.add_argument(
        "--first-quantiles",
        nargs="+",
        default=["median"],
        help="caps of the first batches: median (the prediction) and/or quantile levels such as 0.6",
    )
    parser.add_argument(
        "--retry-policies",
        nargs="+",
        default=list(DEFAULT_RETRY_POLICIES),
        help="retry quantiles of +resume, comma-separated per policy; none: straight to --max-length",
    )
    parser.add_argument("--device", default="cpu", help="where the proxy predicts")
    parser.add_argument("--output-json", default=None)
    add_predictor_arguments(parser)
    args = parser.parse_args(argv)
    for flag in ("--last", "--num-data", "--max-length", "--batch-size", "--group-size"):
        check_range(flag, getattr(args, flag[2:].replace("-", "_")), 1)
    check_predictor_arguments(args)
    check_output_file("--output-json", args.output_json)
    if args.last is None and args.num_data is None:
        args.last = 1000
    if args.length_path is None:
        args.length_path = default_length_path(args.data_path)
    try:
        args.first_levels = [None if text == "median" else float(text) for text in args.first_quantiles]
        args.retry_levels = [
            [] if text == "none" else [float(level) for level in text.split(",")] for text in args.retry_policies
        ]
    except ValueError:
        raise UserError("--first-quantiles and --retry-policies take levels such as 0.8 (or median, none)") from None
    for level in [*args.first_levels, *itertools.chain(*args.retry_levels)]:
        check_range("a quantile level", level, 0, 1, open_low=True, open_high=True)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    samples = load_conversations(args.data_path)
    if args.last is not None:
        samples = samples[-args.last :]
    else:
        samples = select_samples(samples, args.num_data, 42)
    ids = [sample.id for sample in samples]
    table = load_length_file(args.length_path, (args.replay_field,))
    require_ids(table, ids, args.length_path)
    lengths = {sample_id: int(table[sample_id][args.replay_field]) for sample_id in ids}

    predictor = build_predictor("proxy", predictor_context(args))
    predictions = predictor.predict(samples)
    levels = sorted({level for level in [*args.first_levels, *itertools.chain(*args.retry_levels)] if level})
    quantiles = {level: predictor.predict_quantile(samples, level) for level in levels}

    rows = []
    print(
        f"{len(ids)} samples of {args.data_path}, ending at {args.replay_field}; batch {args.batch_size}, "
        f"group {args.group_size}, max length {args.max_length}"
    )
    print(
        f"{'first cap':<10}{'vbs':<5}{'resume':<8}{'retries':<20}{'avg length':>11}{'effective':>11}"
        f"{'retried':>9}{'resumed/sample':>16}"
    )
    for first, vbs, resume, retry in itertools.product(
        args.first_levels, (False, True), (False, True), args.retry_levels
    ):
        if retry and not resume:
            continue  # capped retries are +resume's (src.running.settings.resume_retry_levels)
        config = ScheduleConfig(
            batch_size=args.batch_size,
            group_size=args.group_size,
            max_length=args.max_length,
            vbs=vbs,
            fcr=True,
            resume=resume,
        )
        record = run_schedule(
            ids,
            predictions,
            config,
            replay_executor(lengths),
            caps=quantiles[first] if first else None,
            retry_caps=[quantiles[level] for level in retry],
        )
        metrics = compute_metrics(record)
        row = {
            "first_cap": first or "median",
            "vbs": vbs,
            "resume": resume,
            "retry_quantiles": retry,
            **{name: metrics[name] for name in ("average_length", "effective_token_ratio", "failure_ratio")},
            "resumed_tokens_per_sample": metrics["resumed_tokens"] / len(ids),
        }
        rows.append(row)
        print(
            f"{str(row['first_cap']):<10}{'yes' if vbs else 'no':<5}{'yes' if resume else 'no':<8}"
            f"{' '.join(map(str, retry)) or '-':<20}{row['average_length']:>11.2f}"
            f"{row['effective_token_ratio'] * 100:>10.2f}%{row['failure_ratio'] * 100:>8.2f}%"
            f"{row['resumed_tokens_per_sample']:>16.1f}"
        )
    best = max(rows, key=lambda row: row["effective_token_ratio"])
    print(
        f"best: first cap {best['first_cap']}, vbs {best['vbs']}, resume {best['resume']}, retries "
        f"{best['retry_quantiles']}: {best['effective_token_ratio'] * 100:.2f} %"
    )
    output = {"args": dict(vars(args)), "policies": rows}
    if args.output_json:
        write_json_atomic(args.output_json, output)
    return output


if __name__ == "__main__":
    run_cli(main)
