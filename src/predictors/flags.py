"""The length predictors' flags that the commands share, and the `PredictorContext` built from them."""

from __future__ import annotations

from ..common.cli import check_range
from ..common.utils import resolve_device


def add_predictor_arguments(parser) -> None:
    """The flags of the length predictors that the commands with --strategy share (benchmark, eval, predict, infer)."""
    from .proxy import SHIPPED_PROXY_PATH  # the proxy's module imports torch: only when a parser is built

    parser.add_argument(
        "--prediction-batch-size", type=int, default=128, help="prompts per length-prediction batch (po, seqsch)"
    )
    parser.add_argument("--constant-length", type=int, default=None, help="the length of strategy constant")
    parser.add_argument(
        "--predictor-path",
        default=SHIPPED_PROXY_PATH,
        help="folder of a proxy predictor (python -m src.train_proxy or src.fit_proxy); default: the one that ships, "
        "trained on Vicuna-7B's lengths",
    )
    parser.add_argument(
        "--predictions-path",
        default=None,
        help="strategy file: the lengths and quantiles python -m src.predict wrote (predict where the predictor is "
        "installed, run where the model is)",
    )


def check_predictor_arguments(args) -> None:
    """The ranges of the flags `add_predictor_arguments` adds (not given: passes)."""
    check_range("--prediction-batch-size", args.prediction_batch_size, 1)
    check_range("--constant-length", args.constant_length, 1)


def predictor_context(args):
    """The PredictorContext of a CLI's parsed flags (`add_predictor_arguments`, --max-length, --length-path,
    --device, and --gt-field where the CLI has it); the model is attached once it is loaded."""
    from .registry import PredictorContext

    return PredictorContext(
        max_length=args.max_length,
        length_path=args.length_path,
        options={
            "prediction_batch_size": args.prediction_batch_size,
            "constant_length": args.constant_length,
            "gt_field": getattr(args, "gt_field", None),
            "predictor_path": args.predictor_path,
            "predictions_path": args.predictions_path,
            "predictor_device": resolve_device(args.device),
        },
    )
