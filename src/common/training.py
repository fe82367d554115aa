"""What the training commands (train_lora, train_proxy) share."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import torch

from .utils import UserError


def right_pad(sequences: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Training batches: each row starts at column 0, padding and a zero mask after it."""
    width = max(len(sequence) for sequence in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)  # [B, T]
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)  # [B, T]
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        attention_mask[row, : len(sequence)] = 1
    return input_ids, attention_mask


def check_training_arguments(training_args) -> None:
    """The TrainingArguments values that transformers lets through and that then fail deep in training, or train
    nothing: each is refused in one line before any model loads."""
    from .cli import check_range

    check_range("--learning_rate", training_args.learning_rate, 0, open_low=True)
    check_range("--per_device_train_batch_size", training_args.per_device_train_batch_size, 1)
    check_range("--gradient_accumulation_steps", training_args.gradient_accumulation_steps, 1)
    check_range("--weight_decay", training_args.weight_decay, 0)
    check_range("--warmup_steps", training_args.warmup_steps, 0)
    check_range("--max_grad_norm", training_args.max_grad_norm, 0)
    if training_args.max_steps <= 0:  # then the epochs decide how long it trains
        check_range("--num_train_epochs", training_args.num_train_epochs, 0, open_low=True)


def lock_training_output(training_args):
    """One run per --output_dir: the main process holds `<output_dir>.lock` (answers.OutputLock) from before it
    resumes from or writes in the folder until the run ends; a second run is refused naming the holder's pid. Without
    it, two runs resume from the same checkpoints, write into one training folder, and each swaps its result in."""
    from contextlib import nullcontext

    from .answers import OutputLock

    if training_args.process_index != 0:  # launched processes: the main one holds it for all
        return nullcontext()
    return OutputLock(Path(training_args.output_dir), "--output_dir")


# Written into a training folder when a run starts there: what the run trains, so that a resume from its checkpoints
# is known to continue the same training.
TRAINING_REQUEST_FILE = "training_request.json"


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def check_resume_is_the_same_training(folder: Path, request: dict, resume_from: str | None) -> None:
    """A resume from `folder`'s checkpoints continues the training they were saved by, or is refused naming the
    first setting that differs (another data file, another LoRA shape, another learning rate, ...)."""
    if resume_from is None:
        return
    marker = folder / TRAINING_REQUEST_FILE
    if not marker.is_file():
        raise UserError(
            f"{folder} holds checkpoints that record no training request, so a resume cannot tell that they continue "
            f"this training: remove {folder} to start over"
        )
    saved = json.loads(marker.read_text())
    for key in sorted(set(saved) | set(request)):
        if saved.get(key) != request.get(key):
            raise UserError(
                f"{folder} holds checkpoints of another training ({key} was {saved.get(key)!r}, now "
                f"{request.get(key)!r}): run the same command to resume it, or remove {folder} to start over"
            )


def training_request(model_args, data_args, lora_args, training_args, pairs: list[tuple[str, str]]) -> dict:
    """What a run trains: its examples (by hash) and the settings that change its weights, recorded in its folder so
    that a resume from its checkpoints is checked to continue the same training."""
    kept = ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs")
    # not the process count: train.sh's plain --check_only process sees 1 where its launched ones see several
    kept += ("max_steps", "seed", "lr_scheduler_type", "warmup_steps", "weight_decay")
    request = {
        **{f"--{key}": value for key, value in asdict(model_args).items()},
        "the training examples' sha256": text_sha256(json.dumps(pairs, ensure_ascii=False)),
        "--model_max_length": data_args.model_max_length,
        **{f"--{key}": value for key, value in asdict(lora_args).items()},
        **{f"--{key}": getattr(training_args, key) for key in kept},
    }
    return json.loads(json.dumps(request))  # as it reads back from the file: enums as their text
