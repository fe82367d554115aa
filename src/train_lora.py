"""Instruction-tune the length perception module: a LoRA adapter that answers the query prompt with a length.

    bash train.sh            # the paper's run on Vicuna-7B (under accelerate launch)
    bash train.sh cpu        # a small preset for SmolLM2-135M on CPU
    bash train.sh --help     # the presets' settings

Arguments are dataclasses read by HfArgumentParser; every transformers TrainingArguments flag works too.
Every check (flags, the data file, the base model's folder, the output folder) runs before the model loads
(`--check_only True` stops there). With `--save_strategy steps` a checkpoint is saved every `--save_steps`, and the
same command after an interruption resumes from the last one in `--output_dir`; a folder that holds a finished
adapter is refused unless `--overwrite True`, which trains beside it in `<output_dir>.replacing` and swaps the new
adapter in at the end, so that an interrupted replacement leaves the finished adapter as it was (and resumes there).
The prompt is built by the same PromptFormatter as at inference, and the loss covers only the answer tokens
(the bucket and its end-of-turn token), masked by prompt length and attention mask rather than by pad id,
since some tokenizers (SmolLM2's) pad with their EOS.
"""

from __future__ import annotations

import json
import sys
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .common.cli import check_output_dir, check_range, run_cli
from .common.models import check_model_name
from .common.training import (
    TRAINING_REQUEST_FILE,
    check_resume_is_the_same_training,
    check_training_arguments,
    lock_training_output,
    right_pad,
    training_request,
)
from .common.utils import UserError, write_json_atomic


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="./ckpts/vicuna-7b", metadata={"help": "base model: folder, hub id, or smollm2-135m"}
    )
    model_dtype: str = field(
        default="float32", metadata={"help": "dtype of the frozen base weights: float32, bfloat16 or float16"}
    )
    conv_template: str | None = field(default=None, metadata={"help": "as --conv-template of the other CLIs"})
    load_format: str = field(
        default="auto",
        metadata={"help": "dummy: the architecture with random weights (vicuna-7b-shape): a smoke test of the path"},
    )


@dataclass
class DataArguments:
    data_path: str = field(
        default="data/alpaca-train-10k-instruct.json", metadata={"help": "the output of python -m src.construct"}
    )
    model_max_length: int = field(default=1024, metadata={"help": "longer examples lose the start of their prompt"})
    num_data: int | None = field(default=None, metadata={"help": "use only the first N examples"})


@dataclass
class RunArguments:
    check_only: bool = field(default=False, metadata={"help": "check the arguments and files, then stop (train.sh)"})
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "replace a finished adapter in --output_dir (trained in <output_dir>.replacing, then swapped)"
        },
    )


# Written last, once the adapter is saved: its presence marks a finished run.
ARGUMENTS_FILE = "length_perception_args.json"


@dataclass
class LoraArguments:
    lora_r: int = field(default=8, metadata={"help": "LoRA rank (the paper's: 8)"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (the paper's: 16)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout (the paper's: 0.05)"})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "v_proj"], metadata={"help": "projections that get adapters"}
    )


def build_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_lengths: list[int]) -> torch.Tensor:
    """Labels that train only the answer: prompt positions and padding get -100."""
    # input_ids, attention_mask: [B, T], right-padded
    labels = input_ids.clone()
    positions = torch.arange(input_ids.shape[1]).unsqueeze(0)  # [1, T]
    prompt = positions < torch.tensor(prompt_lengths).unsqueeze(1)  # [B, T]
    labels[prompt | (attention_mask == 0)] = -100
    return labels


def encode_example(formatter, human: str, answer: str, end_token_id: int, max_length: int) -> dict:
    """Prompt ids through the inference formatter, then the answer and its end token."""
    prompt_ids = formatter.encode(human)
    answer_ids = formatter.tokenizer(answer, add_special_tokens=False).input_ids + [end_token_id]
    overflow = len(prompt_ids) + len(answer_ids) - max_length
    if overflow > 0:
        prompt_ids = prompt_ids[overflow:]
    return {"input_ids": prompt_ids + answer_ids, "prompt_length": len(prompt_ids)}


class AnswerOnlyCollator:
    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict]) -> dict:
        input_ids, attention_mask = right_pad([example["input_ids"] for example in examples], self.pad_token_id)
        labels = build_labels(input_ids, attention_mask, [example["prompt_length"] for example in examples])
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def read_conversations(data_args: DataArguments) -> list[tuple[str, str]]:
    """The (human, answer) pairs of the instruction file (its first --num_data), checked before any model loads."""
    from .common.utils import read_json

    records = read_json(data_args.data_path, "instruction-tuning file", " (make it with python -m src.construct)")
    if not isinstance(records, list):
        raise UserError(f"{data_args.data_path} is not a list of FastChat conversations (python -m src.construct)")
    if data_args.num_data is not None:
        records = records[: data_args.num_data]
    pairs = []
    for index, record in enumerate(records):
        try:
            human, answer = record["conversations"][0]["value"], record["conversations"][1]["value"]
        except (KeyError, IndexError, TypeError):
            raise UserError(f"{data_args.data_path}: record {index} is not a two-turn FastChat conversation") from None
        pairs.append((human, answer))
    if not pairs:
        raise UserError(f"{data_args.data_path} holds no examples")
    return pairs


def replacement_folder(output_dir: str) -> Path:
    """Where --overwrite trains the adapter that replaces a finished one: beside it, so that the finished adapter
    stays whole until the new one is saved, and the swap is a rename on one filesystem."""
    folder = Path(output_dir)
    return folder.with_name(folder.name + ".replacing")


def plan_training_folder(output_dir: str, overwrite: bool) -> tuple[Path, str | None]:
    """(the folder to train in, the checkpoint to resume from, if any); refuses to replace a finished adapter
    without --overwrite. With it, training goes to `replacement_folder`, and resumes from that folder's checkpoints
    when an earlier --overwrite run was interrupted."""
    from transformers.trainer_utils import get_last_checkpoint

    check_output_dir("--output_dir", output_dir)
    folder = Path(output_dir)
    finished = (folder / ARGUMENTS_FILE).is_file()
    if finished and not overwrite:
        raise UserError(
            f"--output_dir {output_dir} holds a finished adapter: choose another folder, or pass --overwrite True"
        )
    training_folder = replacement_folder(output_dir) if finished else folder
    if not training_folder.is_dir() or (overwrite and not finished):
        return training_folder, None
    return training_folder, get_last_checkpoint(str(training_folder))


def finished_run(folder: Path) -> dict | None:
    """The arguments file of the finished adapter in `folder`, or None."""
    marker = folder / ARGUMENTS_FILE
    return json.loads(marker.read_text()) if marker.is_file() else None


def settle_interrupted_replacement(output_dir: str) -> bool:
    """An --overwrite run killed after its new adapter was marked finished leaves a finished adapter in
    `<output_dir>.replacing`: the new one, not yet swapped in (its `replaces` is the adapter in output_dir: the swap
    is done now, and True returned), or the old one, swapped out but not yet deleted (output_dir's `replaces` names
    it: it is deleted, so that this run neither resumes from its checkpoints nor swaps it back). Each finished adapter
    records a `run_id`, and a replacement the `run_id` it replaces."""
    import shutil

    from .common.utils import replace_folder

    folder, replacing = Path(output_dir), replacement_folder(output_dir)
    aside, current = finished_run(replacing), finished_run(folder)
    if aside is None or current is None:
        return False
    if aside.get("replaces") is not None and aside.get("replaces") == current.get("run_id"):
        replace_folder(replacing, folder)
        print(f"the adapter an interrupted run finished is now in {output_dir}")
        return True
    if current.get("replaces") is not None and current.get("replaces") == aside.get("run_id"):
        shutil.rmtree(replacing)
        return False
    raise UserError(
        f"{replacing} holds a finished adapter that is neither the one {output_dir} replaced nor its replacement: "
        "move it away, then run again"
    )


def forget_unfinished_run(folder: Path) -> None:
    """--overwrite on a folder with no finished adapter: the checkpoints of the run it replaces go, so that this
    run starts from step 0 and an interruption of it resumes from its own checkpoints only."""
    import shutil

    for checkpoint in folder.glob("checkpoint-*"):
        shutil.rmtree(checkpoint)


def parse_args(argv: list[str] | None = None) -> tuple:
    """(ModelArguments, DataArguments, LoraArguments, RunArguments, TrainingArguments), their values checked."""
    from transformers import HfArgumentParser, TrainingArguments

    parser = HfArgumentParser((ModelArguments, DataArguments, LoraArguments, RunArguments, TrainingArguments))
    try:
        model_args, data_args, lora_args, run_args, training_args = parser.parse_args_into_dataclasses(
            args=sys.argv[1:] if argv is None else argv
        )
    except ValueError as error:  # unknown flags, or values TrainingArguments rejects
        raise UserError(f"train_lora arguments: {error}") from None
    check_range("--lora_r", lora_args.lora_r, 1)
    check_range("--lora_alpha", lora_args.lora_alpha, 0, open_low=True)
    check_range("--lora_dropout", lora_args.lora_dropout, 0, 1, open_high=True)
    check_range("--model_max_length", data_args.model_max_length, 1)
    check_range("--num_data", data_args.num_data, 1)
    check_training_arguments(training_args)
    check_model_name("--model_name_or_path", model_args.model_name_or_path)
    if model_args.load_format not in ("auto", "dummy"):
        raise UserError(f"--load_format must be auto or dummy, got {model_args.load_format!r}")
    return model_args, data_args, lora_args, run_args, training_args


def add_lora_adapter(model, lora_args: LoraArguments, seed: int):
    """The base model with a fresh LoRA adapter on --lora_target_modules, the only weights that train."""
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    model.config.use_cache = False  # no KV cache while training
    lora_config = LoraConfig(
        r=lora_args.lora_r,
        lora_alpha=lora_args.lora_alpha,
        lora_dropout=lora_args.lora_dropout,
        target_modules=lora_args.lora_target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    set_seed(seed)  # the adapter's initial weights too: the same command trains the same adapter
    return get_peft_model(model, lora_config)


def plan_run(model_args, data_args, lora_args, run_args, training_args) -> tuple[Path, str | None, list] | None:
    """(the folder to train in, the checkpoint to resume from, the examples), every check done and the training
    request recorded in that folder; None when there is nothing to train (--check_only, or an interrupted
    replacement that only needed its swap)."""
    output_dir, main_process = training_args.output_dir, training_args.process_index == 0
    if run_args.overwrite and main_process and settle_interrupted_replacement(output_dir):
        return None
    training_folder, resume_from = plan_training_folder(output_dir, run_args.overwrite)
    pairs = read_conversations(data_args)
    request = training_request(model_args, data_args, lora_args, training_args, pairs)
    check_resume_is_the_same_training(training_folder, request, resume_from)
    if run_args.check_only:
        return None
    if run_args.overwrite and training_folder == Path(output_dir) and main_process:
        forget_unfinished_run(training_folder)
    if main_process:
        write_json_atomic(training_folder / TRAINING_REQUEST_FILE, request)
    return training_folder, resume_from, pairs


def main(argv: list[str] | None = None):
    parsed = parse_args(argv)
    with lock_training_output(parsed[-1]):
        return train(*parsed)


def train(model_args, data_args, lora_args, run_args, training_args):
    """The adapter trained (or its checkpoint resumed) in its training folder, then put in --output_dir."""
    from transformers import Trainer

    from .common.models import load_model_and_formatter
    from .engines.generate import eos_token_ids_of

    output_dir = training_args.output_dir
    planned = plan_run(model_args, data_args, lora_args, run_args, training_args)
    if planned is None:
        return None
    training_folder, resume_from, pairs = planned
    training_args.output_dir = str(training_folder)  # checkpoints go there; the adapter ends in output_dir
    device = "cpu" if training_args.use_cpu or not torch.cuda.is_available() else "cuda"
    model, tokenizer, formatter, path = load_model_and_formatter(
        model_args.model_name_or_path,
        "cpu",
        model_args.model_dtype,
        load_format=model_args.load_format,
        conv_template=model_args.conv_template,
    )
    end_token_id = eos_token_ids_of(model, tokenizer)[0]
    examples = [
        encode_example(formatter, human, answer, end_token_id, data_args.model_max_length) for human, answer in pairs
    ]

    model = add_lora_adapter(model, lora_args, training_args.seed)
    if training_args.local_process_index == 0:
        model.print_trainable_parameters()
        print(f"{len(examples)} examples from {data_args.data_path}, template {formatter.template}, on {device}")
        if resume_from is not None:
            print(f"resuming from {resume_from}")
    training_args.remove_unused_columns = False  # the collator needs prompt_length
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=examples,
        data_collator=AnswerOnlyCollator(tokenizer.pad_token_id),
    )
    trainer.train(resume_from_checkpoint=resume_from)
    trainer.save_model(str(training_folder))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(training_folder))
        training = {**json.loads(training_args.to_json_string()), "output_dir": output_dir}
        arguments = {
            "model": asdict(model_args),
            "data": asdict(data_args),
            "lora": asdict(lora_args),
            "resumed_from": resume_from,
            "training": training,
            "base_model_path": path,
            "template": formatter.template,
            "processes": training_args.world_size,
        }
        finish_adapter(training_folder, Path(output_dir), arguments)
    return trainer


def finish_adapter(training_folder: Path, output_folder: Path, arguments: dict) -> None:
    """Mark the saved adapter finished (its arguments file, written last, with a `run_id` and the `run_id` it replaces),
    then, for --overwrite, put its folder where the finished one it replaces is, in one step: a reader finds the old
    adapter or the new one."""
    from .common.utils import replace_folder

    replaced = finished_run(output_folder) if training_folder != output_folder else None
    arguments = {**arguments, "run_id": uuid.uuid4().hex, "replaces": (replaced or {}).get("run_id")}
    write_json_atomic(training_folder / ARGUMENTS_FILE, arguments)
    if training_folder != output_folder:
        replace_folder(training_folder, output_folder)
    print(f"adapter saved to {output_folder}")


if __name__ == "__main__":
    run_cli(main)
