"""Train the `proxy` length predictor: a small encoder that reads a prompt and predicts the served model's L_max.

    python -m src.train_proxy --output_dir ckpts/proxy-minilm          # data/alpaca-train-10k.json
    python -m src.eval --strategy proxy --predictor-path ckpts/proxy-minilm   # data/alpaca-val-10k.json

The target is L_max (the largest length over the recorded temperatures, as the paper) on a log scale, with a
quantile loss: the median head minimises the mean absolute error, the upper heads give FCR caps. The last
`--holdout` rows of the training file are kept out of training and reported, so settings are chosen without
touching the val set. Arguments are dataclasses read by HfArgumentParser; every TrainingArguments flag works.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .common.cli import check_output_dir, check_range, run_cli
from .common.data import PAPER_TRAIN_DATA
from .common.training import check_training_arguments, lock_training_output, right_pad
from .common.utils import UserError, set_seed
from .predictors.proxy import CONFIG_NAME, DEFAULT_PROXY_PATH
from .predictors.proxy_calibration import calibration_record


@dataclass
class ProxyArguments:
    encoder: str = field(default="minilm", metadata={"help": "minilm (packaged all-MiniLM-L6-v2), a folder or hub id"})
    data_path: str = field(default=PAPER_TRAIN_DATA, metadata={"help": "FastChat conversation file"})
    length_path: str | None = field(default=None, metadata={"help": "its length file; default: data path + -length"})
    num_data: int | None = field(default=None, metadata={"help": "use only the first N rows of the data file"})
    holdout: int = field(default=1000, metadata={"help": "last rows kept out of training, to choose settings on"})
    max_tokens: int = field(default=256, metadata={"help": "prompt tokens the encoder reads (longer are truncated)"})
    target_field: str | None = field(
        default=None,
        metadata={"help": "length field to learn, e.g. L_t0.0 (the greedy length replayed runs serve); default L_max"},
    )
    ranking_weight: float = field(
        default=0.0, metadata={"help": "weight of a pairwise ranking loss (RankNet) on the median, beside the pinball"}
    )
    auxiliary_weight: float = field(
        default=0.0,
        metadata={
            "help": "weight of an auxiliary loss on the median of each recorded temperature's length (the length "
            "file's L_t<temperature> columns), beside the main target's; training only"
        },
    )
    recalibrate: bool = field(
        default=True, metadata={"help": "fit each quantile's offset on the held-out rows so that it covers its level"}
    )
    recalibrate_only: bool = field(
        default=False,
        metadata={"help": "no training: recalibrate the predictor in --output_dir on the held-out rows of --data_path"},
    )
    quantiles: list[float] = field(
        default_factory=lambda: [0.5, 0.6, 0.7, 0.8, 0.9, 0.95],
        metadata={"help": "quantile heads; the first must be 0.5, the prediction"},
    )
    init_from: str | None = field(
        default=None,
        metadata={
            "help": "a saved predictor to fine-tune (its encoder, head and quantiles) instead of a fresh head on "
            "--encoder; its held-out accuracy is printed before training"
        },
    )
    overwrite: bool = field(
        default=False, metadata={"help": "replace a predictor already in --output_dir (else refused)"}
    )


class PaddingCollator:
    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict]) -> dict:
        input_ids, attention_mask = right_pad([example["input_ids"] for example in examples], self.pad_token_id)
        labels = torch.tensor([example["labels"] for example in examples], dtype=torch.float32)  # [B], or [B, 1 + A]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def auxiliary_lengths(args: ProxyArguments, ids: list[str]) -> dict[str, list[int]]:
    """--auxiliary_weight: id -> every L_t<temperature> length of its row, in the file's column order."""
    from .common.data import default_length_path, load_length_file, temperature_fields

    length_path = args.length_path or default_length_path(args.data_path)
    table = load_length_file(length_path)
    fields = temperature_fields(table[ids[0]])
    for sample_id in ids:
        if temperature_fields(table[sample_id]) != fields:
            raise UserError(
                f"length file {length_path}: id {sample_id} has other L_t<temperature> fields than {fields}"
            )
    return {sample_id: [int(table[sample_id][name]) for name in fields] for sample_id in ids}


def load_rows(args: ProxyArguments):
    """(samples, target length by id: L_max, or --target_field) of the data file, checked to match."""
    from .common.data import default_length_path, load_conversations, load_length_file, load_max_lengths, require_ids

    samples = load_conversations(args.data_path)
    if args.num_data is not None:
        samples = samples[: args.num_data]
    length_path = args.length_path or default_length_path(args.data_path)
    if args.target_field:
        table = load_length_file(length_path, (args.target_field,))
        max_lengths = {sample_id: int(row[args.target_field]) for sample_id, row in table.items()}
    else:
        max_lengths = load_max_lengths(length_path)
    require_ids(max_lengths, [sample.id for sample in samples], length_path)
    return samples, max_lengths


def parse_args(argv: list[str] | None = None) -> tuple:
    """(ProxyArguments, TrainingArguments), checked before any data or model loads."""
    from transformers import HfArgumentParser, TrainingArguments

    parser = HfArgumentParser((ProxyArguments, TrainingArguments))
    defaults = {
        "output_dir": DEFAULT_PROXY_PATH,
        "num_train_epochs": 2,
        "per_device_train_batch_size": 32,
        "learning_rate": 8e-5,  # the rate of the proxy that docs/PERCEPTION.md reports
        "lr_scheduler_type": "linear",
        "warmup_steps": 0.05,
        "weight_decay": 0.01,
        "logging_steps": 25,
        "save_strategy": "no",
        "report_to": "none",
        "seed": 42,
        "train_sampling_strategy": "group_by_length",  # prompts vary 10x in length: similar ones pad little
    }
    parser.set_defaults(**defaults)
    try:
        args, training_args = parser.parse_args_into_dataclasses(args=sys.argv[1:] if argv is None else argv)
    except ValueError as error:
        raise UserError(f"train_proxy arguments: {error}") from None
    for level in args.quantiles:
        check_range("--quantiles", level, 0, 1, open_low=True, open_high=True)
    if not args.quantiles or args.quantiles[0] != 0.5 or sorted(set(args.quantiles)) != args.quantiles:
        raise UserError("--quantiles must start at 0.5 and increase, e.g. 0.5 0.7 0.9")
    check_training_arguments(training_args)
    check_range("--holdout", args.holdout, 0)
    check_range("--max_tokens", args.max_tokens, 1)
    check_range("--ranking_weight", args.ranking_weight, 0)
    check_range("--auxiliary_weight", args.auxiliary_weight, 0)
    check_range("--num_data", args.num_data, 1)
    check_output_dir("--output_dir", training_args.output_dir)
    if args.init_from and args.auxiliary_weight:
        raise UserError("--auxiliary_weight trains a fresh head beside the encoder: it does not apply to --init_from")
    if not args.recalibrate_only and not args.overwrite and (Path(training_args.output_dir) / CONFIG_NAME).is_file():
        raise UserError(
            f"{training_args.output_dir} holds a trained predictor: choose another --output_dir, or pass --overwrite "
            "True to replace it"
        )
    return args, training_args


def main(argv: list[str] | None = None) -> dict:
    args, training_args = parse_args(argv)
    with lock_training_output(training_args):
        return train(args, training_args)


def train(args: ProxyArguments, training_args) -> dict:
    """The predictor trained on the rows and saved in --output_dir (or only recalibrated there)."""
    from .predictors.proxy import save_proxy

    samples, max_lengths = load_rows(args)
    if len(samples) <= args.holdout:
        raise UserError(f"{args.data_path}: {len(samples)} rows leave none to train on with --holdout {args.holdout}")
    train, held = (samples[: -args.holdout], samples[-args.holdout :]) if args.holdout else (samples, [])
    if args.recalibrate_only:
        return recalibrate_saved(training_args.output_dir, held, max_lengths, args.data_path, args.num_data)

    median = statistics.median(max_lengths[sample.id] for sample in train)
    set_seed(training_args.seed)  # the heads' initial weights too: the Trainer seeds only after they exist
    model, tokenizer, encoder_path, before, auxiliary = build_model(args, train, held, max_lengths, median)
    print(f"{len(train)} training rows, {len(held)} held out, from {args.data_path}; encoder {encoder_path}")
    trainer, train_seconds = train_model(args, training_args, model, tokenizer, train, max_lengths, auxiliary)

    holdout_metrics, holdout_predictions = None, {}
    if held and trainer.is_world_process_zero():
        holdout_metrics, holdout_predictions = evaluate_held_out(args, model, tokenizer, held, max_lengths, before)
    calibration = None
    if held and args.recalibrate and trainer.is_world_process_zero():
        rows = [holdout_predictions[sample.id] for sample in held]
        targets = [max_lengths[sample.id] for sample in held]
        calibration = calibration_record(args.quantiles, rows, targets, args.data_path)
    if trainer.is_world_process_zero():
        config = {
            "max_tokens": args.max_tokens,
            "target": f"log({args.target_field or 'L_max'})",
            "encoder_source": encoder_path,
            "train_rows": len(train),
            "train_median_length": median,
            "train_seconds": train_seconds,
            "holdout_metrics": holdout_metrics,
            "holdout_metrics_before": before,
            "init_from": args.init_from,
            "calibration": calibration,
            "arguments": asdict(args),
            "training": json.loads(training_args.to_json_string()),
        }
        save_proxy(model, tokenizer, training_args.output_dir, config, base_encoder=encoder_path)
        print(f"training took {train_seconds:.0f} s; predictor saved to {training_args.output_dir}")
    return {
        "train_seconds": train_seconds,
        "holdout_metrics": holdout_metrics,
        "holdout_metrics_before": before,
        "holdout": holdout_predictions,
    }


def build_model(args: ProxyArguments, train: list, held: list, max_lengths: dict, median: float):
    """The model to train, its tokenizer, the encoder folder it starts from, its held-out accuracy before training
    (--init_from only, else None) and the auxiliary lengths by id ({} without --auxiliary_weight)."""
    from transformers import AutoModel, AutoTokenizer

    from .predictors.proxy import resolve_encoder
    from .predictors.proxy_model import LengthProxy

    if args.init_from:  # --auxiliary_weight was refused with it
        model, tokenizer, encoder_path, before = start_from_saved(args, held, max_lengths)
        return model, tokenizer, encoder_path, before, {}
    encoder_path = resolve_encoder(args.encoder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(encoder_path)
        encoder = AutoModel.from_pretrained(encoder_path, dtype=torch.float32)
    except OSError as error:
        message = str(error).splitlines()[0]
        raise UserError(f"encoder {args.encoder} will not load ({message}): pass minilm or a local folder") from None
    auxiliary = auxiliary_lengths(args, [sample.id for sample in train]) if args.auxiliary_weight else {}
    auxiliary_count = len(next(iter(auxiliary.values()))) if auxiliary else 0
    model = LengthProxy(
        encoder,
        tuple(args.quantiles),
        math.log(median),
        args.ranking_weight,
        auxiliary_count,
        args.auxiliary_weight,
    )
    return model, tokenizer, encoder_path, None, auxiliary


def train_model(args: ProxyArguments, training_args, model, tokenizer, train: list, max_lengths: dict, auxiliary: dict):
    """Fit the model to the log lengths of the training rows; (the trainer, the seconds it took)."""
    from transformers import Trainer

    def encode(sample) -> dict:
        ids = tokenizer(sample.prompt, truncation=True, max_length=args.max_tokens).input_ids
        label = math.log(max(1, max_lengths[sample.id]))
        if auxiliary:  # [1 + A]: the target, then each temperature's length
            label = [label] + [math.log(max(1, length)) for length in auxiliary[sample.id]]
        return {"input_ids": ids, "labels": label}

    training_args.remove_unused_columns = False
    training_args.label_names = ["labels"]
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=[encode(sample) for sample in train],
        data_collator=PaddingCollator(tokenizer.pad_token_id),
    )
    start = time.perf_counter()
    trainer.train()
    return trainer, time.perf_counter() - start


def evaluate_held_out(args: ProxyArguments, model, tokenizer, held: list, max_lengths: dict, before: dict | None):
    """The trained model's metrics on the held-out rows, printed, and its quantile predictions by id."""
    from .predictors.proxy import LoadedProxy
    from .scheduling.batches import clamp_prediction
    from .scheduling.metrics import length_metrics

    model.eval()
    loaded = LoadedProxy.__new__(LoadedProxy)  # the in-memory model, without a save and reload
    loaded.model, loaded.tokenizer, loaded.device = model, tokenizer, str(next(model.parameters()).device)
    loaded.max_tokens, loaded.quantiles = args.max_tokens, tuple(args.quantiles)
    quantiles = loaded.predict_quantiles([sample.prompt for sample in held])
    predictions = [clamp_prediction(row[0], 10**9) for row in quantiles]
    holdout_predictions = {sample.id: row for sample, row in zip(held, quantiles, strict=True)}
    holdout_metrics = length_metrics(predictions, [max_lengths[sample.id] for sample in held])
    print(f"held-out {len(held)} rows, {'after' if before else 'trained'}: {describe_metrics(holdout_metrics)}")
    return holdout_metrics, holdout_predictions


def describe_metrics(metrics: dict) -> str:
    return (
        f"Error {metrics['error']:.1f} tokens, Acc-50 {metrics['acc_50'] * 100:.1f} %, "
        f"Acc-100 {metrics['acc_100'] * 100:.1f} %, Kendall's tau {metrics['kendall_tau']:.3f}"
    )


def start_from_saved(args: ProxyArguments, held: list, max_lengths: dict):
    """--init_from: the saved predictor's model (encoder and head, in training mode), its tokenizer, the folder of the
    packaged encoder it was fine-tuned from (None when it stores its encoder whole) and its accuracy on the held-out
    rows before any training (None without held-out rows)."""
    from .predictors.proxy import LoadedProxy, resolve_encoder
    from .scheduling.batches import clamp_prediction
    from .scheduling.metrics import length_metrics

    loaded = LoadedProxy(args.init_from)
    if list(loaded.quantiles) != list(args.quantiles):
        args.quantiles = list(loaded.quantiles)  # the head it continues from decides the levels
    loaded.max_tokens = args.max_tokens
    before = None
    if held:
        rows = loaded.predict_quantiles([sample.prompt for sample in held])
        before = length_metrics(
            [clamp_prediction(row[0], 10**9) for row in rows], [max_lengths[sample.id] for sample in held]
        )
        print(f"held-out {len(held)} rows, before (the predictor in {args.init_from}): {describe_metrics(before)}")
    storage = loaded.config.get("encoder_storage") or {}
    base = resolve_encoder(storage["base"]) if storage.get("kind") == "int8-delta" else None
    loaded.model.train()
    return loaded.model, loaded.tokenizer, base, before


def recalibrate_saved(folder: str, held: list, max_lengths: dict, data_path: str, num_data: int | None) -> dict:
    """--recalibrate_only: fit the offsets of a saved predictor on the held-out rows and rewrite its config."""
    from .common.utils import write_text_atomic
    from .predictors.proxy import CONFIG_NAME, LoadedProxy

    if not held:
        raise UserError("--recalibrate_only fits on the held-out rows: give --holdout a positive number")
    loaded = LoadedProxy(folder)
    trained = loaded.config.get("arguments") or {}
    for key, value in (("data_path", data_path), ("holdout", len(held)), ("num_data", num_data)):
        if key in trained and trained[key] != value:
            raise UserError(
                f"--recalibrate_only: {folder} was trained with --{key} {trained[key]}, not {value}; pass the "
                "training's data, --num_data and --holdout, so that the offsets are fitted on rows it did not train on"
            )
    loaded.offsets = None  # fitted on the heads as trained
    rows = loaded.predict_quantiles([sample.prompt for sample in held])
    calibration = calibration_record(loaded.quantiles, rows, [max_lengths[sample.id] for sample in held], data_path)
    config = loaded.config | {"calibration": calibration}
    write_text_atomic(Path(folder) / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    print(f"calibration written to {Path(folder) / CONFIG_NAME}")
    return {"calibration": calibration}


if __name__ == "__main__":
    run_cli(main)
