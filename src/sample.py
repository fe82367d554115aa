"""Split Alpaca 52k into the paper's train and val sets of 10k conversations each.

    python -m src.sample --source alpaca_data.json      # the original tatsu-lab/stanford_alpaca file
    python -m src.sample                                # the hub copy, through `datasets`, where reachable

The draw is upstream's: np.random.seed(42); np.random.choice(52002, 20000, replace=False); the first 10k are
train, the rest val, each sorted by id. Ids are FastChat's (`str(index + 1)` in the order of alpaca_data.json)
and the human turn is the Alpaca training template, so the output matches the paper's data files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from .common.cli import MAX_SEED, HelpFormatter, check_output_dir, check_range, run_cli
from .common.prompts import alpaca_human_turn
from .common.utils import UserError, read_json, write_json_atomic

ALPACA_SIZE = 52002
SPLIT_SIZE = 10_000
HUB_DATASET = "tatsu-lab/alpaca"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--source", default=None, help=f"local alpaca_data.json; default: {HUB_DATASET} from the hub")
    parser.add_argument("--output-dir", default="data", help="where alpaca-{train,val}-10k.json go")
    parser.add_argument("--seed", type=int, default=42, help="seed of the draw (the paper's: 42)")
    parser.add_argument("--split-size", type=int, default=SPLIT_SIZE, help="samples per split (the paper's: 10000)")
    args = parser.parse_args(argv)
    check_range("--seed", args.seed, 0, MAX_SEED)
    check_range("--split-size", args.split_size, 1)
    check_output_dir("--output-dir", args.output_dir)
    return args


def load_alpaca(source: str | None) -> list[dict]:
    if source is not None:
        records = read_json(source, "Alpaca file")
    else:
        try:
            from datasets import load_dataset
        except ImportError:
            raise UserError("reading Alpaca from the hub needs `pip install datasets`; or pass --source") from None
        try:
            records = list(load_dataset(HUB_DATASET, split="train"))
        except Exception as error:  # no network, no such dataset: the hub's errors vary
            raise UserError(f"cannot load {HUB_DATASET} from the hub ({type(error).__name__}); pass --source") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) and "instruction" in r for r in records):
        raise UserError(f"{source or HUB_DATASET}: expected a list of {{instruction, input, output}} records")
    return records


def to_conversation(index: int, record: dict) -> dict:
    return {
        "id": str(index + 1),
        "conversations": [
            {"from": "human", "value": alpaca_human_turn(record["instruction"], record.get("input", ""))},
            {"from": "gpt", "value": record.get("output", "")},
        ],
    }


def split_indices(num_records: int, seed: int, split_size: int) -> tuple[list[int], list[int]]:
    """Upstream's draw: two disjoint sets of record indices, each sorted."""
    if 2 * split_size > num_records:
        raise UserError(f"cannot draw two splits of {split_size} from {num_records} records")
    np.random.seed(seed)
    drawn = np.random.choice(num_records, 2 * split_size, replace=False)
    return sorted(int(i) for i in drawn[:split_size]), sorted(int(i) for i in drawn[split_size:])


def main(argv: list[str] | None = None) -> dict[str, list[dict]]:
    args = parse_args(argv)
    records = load_alpaca(args.source)
    if len(records) != ALPACA_SIZE:
        print(f"note: {len(records)} records, not Alpaca's {ALPACA_SIZE}: the split will not match the paper's")
    train, val = split_indices(len(records), args.seed, args.split_size)
    outputs = {}
    for name, indices in (("train", train), ("val", val)):
        conversations = [to_conversation(index, records[index]) for index in indices]
        path = Path(args.output_dir) / f"alpaca-{name}-{args.split_size // 1000}k.json"
        write_json_atomic(path, conversations)
        print(f"wrote {len(conversations)} conversations to {path}")
        outputs[name] = conversations
    return outputs


if __name__ == "__main__":
    run_cli(main)
