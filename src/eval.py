"""Length-perception accuracy of a predictor, with the paper's metrics and ranking metrics.

    python -m src.eval                      # the paper: seqsch adapter on Vicuna-7B, first 1000 val rows
    python -m src.eval --strategy po --model smollm2-135m --data-path data/demo.json

Error is mean |prediction - L_max|; Acc-50 and Acc-100 are the fractions within 50 and 100 tokens of L_max
(upstream's definitions); Kendall's tau and Spearman's rho say how well the predictions rank the samples, which is
what scheduling needs; bucket accuracy is the fraction whose 50-token bucket equals L_max's. A predictor with
quantiles (proxy) also gets their calibration: for each level q, the share of samples whose L_max is at most the
predicted q-quantile, printed and drawn as a reliability diagram beside the scatter plot.

Under torchrun or `accelerate launch` with K processes, each predicts every K-th prediction batch and the main
process computes the metrics over all predictions; the cost per 1000 prompts is then the slowest process's time.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .common.cli import HelpFormatter, check_output_file, check_outputs_are_not_inputs, check_range, run_cli
from .common.data import PAPER_VAL_DATA, default_length_path, load_conversations, load_max_lengths, require_ids
from .common.distributed import start_processes
from .common.figures import plot_predictions, plot_reliability
from .common.utils import Timer, UserError, write_json_atomic
from .predictors.flags import add_predictor_arguments, check_predictor_arguments, predictor_context
from .predictors.registry import PREDICTORS, build_predictor
from .running.setup import add_model_arguments, attach_model_if_needed, check_model_arguments
from .scheduling.metrics import length_metrics, quantile_coverage

DEFAULT_ADAPTER = "./ckpts/vicuna-response-length-perception-module"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--data-path", default=PAPER_VAL_DATA, help="FastChat conversation file")
    parser.add_argument("--length-path", default=None, help="its length file; default: data path + -length")
    add_model_arguments(parser)
    parser.add_argument("--strategy", default="seqsch", help=f"predictor: {', '.join(sorted(PREDICTORS))}")
    parser.add_argument("--lora-path", default=None, help=f"adapter for seqsch; default {DEFAULT_ADAPTER}")
    parser.add_argument(
        "--num-data",
        type=int,
        default=1000,
        help="the first N rows, in file order, as the paper evaluates (src.benchmark draws at random instead)",
    )
    parser.add_argument("--max-length", type=int, default=512, help="predictions are clamped to [1, max length]")
    add_predictor_arguments(parser)
    parser.add_argument("--output-json", default=None, help="write the metrics and arguments here")
    parser.add_argument("--plot", default=None, help="scatter plot path; default runs/eval-<strategy>.png")
    parser.add_argument(
        "--calibration-plot",
        default=None,
        help="reliability diagram of the quantiles (proxy); default the --plot path with -calibration before .png",
    )
    args = parser.parse_args(argv)
    for flag, value in (
        ("--num-data", args.num_data),
        ("--max-length", args.max_length),
    ):
        check_range(flag, value, 1)
    check_predictor_arguments(args)
    check_output_file("--output-json", args.output_json)
    if args.strategy not in PREDICTORS:
        raise UserError(f"unknown strategy {args.strategy!r}: choose from {', '.join(sorted(PREDICTORS))}")
    if args.strategy == "seqsch" and args.lora_path is None:
        args.lora_path = DEFAULT_ADAPTER
    check_model_arguments(args, PREDICTORS[args.strategy].needs_model)
    args.length_path = args.length_path or default_length_path(args.data_path)
    # runs/, not imgs/: the figures in imgs/ are the repository's, regenerated only when asked (--plot imgs/...)
    args.plot = args.plot or f"runs/eval-{args.strategy}.png"
    check_output_file("--plot", args.plot)
    plot = Path(args.plot)
    args.calibration_plot = args.calibration_plot or str(plot.with_name(f"{plot.stem}-calibration{plot.suffix}"))
    check_output_file("--calibration-plot", args.calibration_plot)
    check_outputs_are_not_inputs(
        {"--output-json": args.output_json, "--plot": args.plot, "--calibration-plot": args.calibration_plot},
        {"--data-path": args.data_path, "--length-path": args.length_path, "--predictions-path": args.predictions_path}
        | {"--predictor-path": args.predictor_path, "--lora-path": args.lora_path},
    )
    return args


def print_metrics(args: argparse.Namespace, metrics: dict) -> None:
    print(f"Strategy: {args.strategy}, samples: {metrics['num_samples']} (first rows of {args.data_path})")
    print(f"Error: {metrics['error']:.1f} tokens")
    print(f"Acc-50: {metrics['acc_50'] * 100:.1f} %")
    print(f"Acc-100: {metrics['acc_100'] * 100:.1f} %")
    print(f"Kendall's tau: {metrics['kendall_tau']:.3f}, Spearman: {metrics['spearman']:.3f}")
    print(f"Bucket accuracy: {metrics['bucket_accuracy'] * 100:.1f} %")
    print(f"Unparsable: {metrics['unparsable']}")
    print(f"Prediction cost: {metrics['seconds_per_1000']:.2f} s per 1000 prompts")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    processes = start_processes(args.device)
    args.device = processes.device(args.device)
    samples = load_conversations(args.data_path)[: args.num_data]
    max_lengths = load_max_lengths(args.length_path)
    require_ids(max_lengths, [sample.id for sample in samples], args.length_path)
    context = predictor_context(args)
    device = attach_model_if_needed(args, context, args.strategy)
    predictor = build_predictor(args.strategy, context)
    # whole prediction batches are shared out, so the generative predictors (po, seqsch) batch the same prompts as in
    # one process (the proxy re-batches its share by prompt length)
    mine = [sample for batch in processes.share(samples, args.prediction_batch_size) for sample in batch]
    processes.wait()  # start together: the slowest process's time is the run's
    with Timer(device) as timer:
        predicted = predictor.predict(mine) if mine else {}
    quantile_rows = predictor.quantile_rows  # id -> [q-quantile for each level]; None without quantiles
    shares = processes.gather(
        {
            "predictions": predicted,
            "quantiles": None if quantile_rows is None else {sample.id: quantile_rows[sample.id] for sample in mine},
            "seconds": timer.seconds,
            "unparsable": predictor.unparsable,
        }
    )
    if not processes.is_main:
        return {}
    predicted = {key: value for share in shares for key, value in share["predictions"].items()}
    predictions = [predicted[sample.id] for sample in samples]
    targets = [max_lengths[sample.id] for sample in samples]
    metrics = length_metrics(predictions, targets)
    metrics["unparsable"] = sum(share["unparsable"] for share in shares)
    metrics["seconds_per_1000"] = max(share["seconds"] for share in shares) / len(samples) * 1000
    metrics["processes"] = processes.count
    metrics["process_prediction_counts"] = [len(share["predictions"]) for share in shares]
    print_metrics(args, metrics)
    if quantile_rows is not None:
        rows = {key: value for share in shares for key, value in share["quantiles"].items()}
        levels = list(predictor.quantile_levels)
        metrics["calibration"] = quantile_coverage(levels, [rows[sample.id] for sample in samples], targets)
        coverage = ", ".join(f"q{row['level']:g} {row['coverage'] * 100:.1f} %" for row in metrics["calibration"])
        print(f"Quantile coverage (share of L_max at most the predicted quantile): {coverage}")
        worst = max(metrics["calibration"], key=lambda row: abs(row["gap"]))
        print(f"Largest calibration gap: {worst['gap'] * 100:+.1f} points at q{worst['level']:g}")
    plot_predictions(args.plot, predictions, targets, f"{args.strategy}: error {metrics['error']:.1f} tokens")
    print(f"Plot: {args.plot}")
    if quantile_rows is not None:
        plot_reliability(args.calibration_plot, metrics["calibration"], f"{args.strategy}: quantile calibration")
        print(f"Calibration plot: {args.calibration_plot}")
    if args.output_json:
        output = {"args": vars(args), **metrics}
        output["predictions"] = {sample.id: value for sample, value in zip(samples, predictions, strict=True)}
        write_json_atomic(args.output_json, output)
    return metrics


if __name__ == "__main__":
    run_cli(main)
