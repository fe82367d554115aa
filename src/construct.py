"""Build the instruction-tuning set of the length perception module.

    python -m src.construct                      # data/alpaca-train-10k.json + its length file

Each conversation's user turn gets the paper's query prompt on a new line, and the answer becomes the bucket of
L_max (the largest length over the four temperatures, rounded up to a multiple of 50), as the paper. Samples are
joined with the length file by id.
"""

from __future__ import annotations

import argparse

from .common.cli import HelpFormatter, check_output_file, check_outputs_are_not_inputs, run_cli
from .common.data import (
    PAPER_TRAIN_DATA,
    default_length_path,
    json_stem,
    load_conversations,
    load_max_lengths,
    require_ids,
)
from .common.prompts import QUERY_PROMPT, with_length_prompt
from .common.utils import write_json_atomic
from .scheduling.batches import bucket_of


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--data-path", default=PAPER_TRAIN_DATA, help="FastChat conversation file")
    parser.add_argument("--length-path", default=None, help="its length file; default: data path + -length")
    parser.add_argument("--output-path", default=None, help="default: data path + -instruct")
    args = parser.parse_args(argv)
    args.length_path = args.length_path or default_length_path(args.data_path)
    if args.output_path is None:
        args.output_path = f"{json_stem(args.data_path)}-instruct.json"
    check_output_file("--output-path", args.output_path)
    check_outputs_are_not_inputs(
        {"--output-path": args.output_path}, {"--data-path": args.data_path, "--length-path": args.length_path}
    )
    return args


def build_instruct_set(samples, max_lengths: dict[str, int]) -> list[dict]:
    return [
        {
            "id": sample.id,
            "conversations": [
                {"from": "human", "value": with_length_prompt(sample.prompt, QUERY_PROMPT)},
                {"from": "gpt", "value": str(bucket_of(max_lengths[sample.id]))},
            ],
        }
        for sample in samples
    ]


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    samples = load_conversations(args.data_path)
    max_lengths = load_max_lengths(args.length_path)
    require_ids(max_lengths, [sample.id for sample in samples], args.length_path)
    instruct = build_instruct_set(samples, max_lengths)
    write_json_atomic(args.output_path, instruct)
    print(f"wrote {len(instruct)} conversations to {args.output_path}")
    return instruct


if __name__ == "__main__":
    run_cli(main)
