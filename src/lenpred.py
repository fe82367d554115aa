"""Record response lengths: run the model at the paper's four temperatures and write a length file.

    python -m src.lenpred                                   # upstream: Vicuna-7B on data/alpaca-train-10k.json
    python -m src.lenpred --model smollm2-135m --data-path data/demo.json

Output rows: {id, L_gt, L_t0.0, L_t0.3, L_t0.5, L_t0.7}, one per id, in data order. L_gt counts the
dataset's reference answer with the tokenizer (special tokens included, as upstream); L_tT counts the
generated tokens up to and including EOS. Finished batches go to `<output>.partial.jsonl` as they finish,
so an interrupted run started again with the same arguments resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from .data import TEMPERATURES, default_length_path, length_field, load_conversations, select_samples
from .utils import UserError, add_model_arguments, run_cli, set_seed, write_json_atomic


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-path", default="data/alpaca-train-10k.json", help="FastChat conversation file")
    add_model_arguments(parser)
    parser.add_argument("--output-path", default=None, help="length file to write; default: data path + -length")
    parser.add_argument("--seed", type=int, default=42, help="seed of the sample draw and of sampling")
    parser.add_argument("--num-data", type=int, default=None, help="draw this many samples as upstream; default all")
    parser.add_argument("--batch-size", "--bs", type=int, default=16, help="prompts generated together")
    parser.add_argument("--max-length", type=int, default=512, help="most new tokens per response")
    parser.add_argument(
        "--temperatures", type=float, nargs="+", default=list(TEMPERATURES), help="one length column per temperature"
    )
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.max_length < 1:
        raise UserError("--batch-size and --max-length must be at least 1")
    if args.output_path is None:
        args.output_path = default_length_path(args.data_path)
    return args


def partial_path(output_path: str) -> Path:
    return Path(f"{output_path}.partial.jsonl")


def run_identity(args: argparse.Namespace) -> dict:
    """What must match for a partial file to be resumed."""
    return {
        "data_path": os.path.abspath(args.data_path),
        "model": args.model,
        "load_format": args.load_format,
        "conv_template": args.conv_template,
        "max_length": args.max_length,
        "temperatures": args.temperatures,
        "seed": args.seed,
        "num_data": args.num_data,
    }


def read_partial(path: Path, identity: dict) -> dict[str, dict]:
    """Rows finished by an earlier run; a line cut short by a kill is dropped (its batch runs again)."""
    if not path.is_file():
        return {}
    rows = {}
    with open(path, encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    for number, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if number == 0:
            if record.get("run") != identity:
                raise UserError(
                    f"{path} was written by a run with other arguments; rerun with those, or delete it to start over"
                )
            continue
        rows[str(record["id"])] = record
    return rows


def append_rows(path: Path, rows: list[dict], header: dict | None) -> None:
    """Append whole lines and fsync, so a kill loses at most the batch being generated."""
    cut_short = path.is_file() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
    with open(path, "a", encoding="utf-8") as handle:
        if cut_short:  # end a line a kill cut short, so the rows below start on lines of their own
            handle.write("\n")
        if header is not None:
            handle.write(json.dumps(header) + "\n")
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    samples = select_samples(load_conversations(args.data_path), args.num_data, args.seed)
    identity = run_identity(args)
    side_file = partial_path(args.output_path)
    done = read_partial(side_file, identity)
    todo = [sample for sample in samples if sample.id not in done]
    if done:
        print(f"resuming: {len(done)} of {len(samples)} samples already in {side_file}")

    if todo:
        from tqdm import tqdm

        from .generate import eos_token_ids_of, generate_batch
        from .prompts import PromptFormatter, choose_template
        from .utils import load_model

        model, tokenizer, model_path = load_model(args.model, args.device, args.dtype, None, args.load_format)
        formatter = PromptFormatter(tokenizer, choose_template(model_path, tokenizer, args.conv_template))
        eos_token_ids = eos_token_ids_of(model, tokenizer)
        header = None if side_file.is_file() and done else {"run": identity}
        if header is not None and side_file.exists():
            side_file.unlink()  # a header and no finished rows (or half a header): start the file afresh
        with tqdm(total=len(samples), initial=len(done), desc="lenpred", unit="sample") as progress:
            for start in range(0, len(todo), args.batch_size):
                batch = todo[start : start + args.batch_size]
                prompts = [formatter.encode(sample.prompt) for sample in batch]
                rows = [
                    {"id": sample.id, "L_gt": len(tokenizer(sample.reference).input_ids) if sample.reference else 0}
                    for sample in batch
                ]
                for temperature in args.temperatures:
                    set_seed(args.seed)  # the same batch gets the same draws when a run resumes
                    generated = generate_batch(
                        model, tokenizer, prompts, args.max_length, temperature, eos_token_ids=eos_token_ids
                    )
                    for row, sample in zip(rows, generated, strict=True):
                        row[length_field(temperature)] = sample.length
                append_rows(side_file, rows, header)
                header = None
                done.update({row["id"]: row for row in rows})
                progress.update(len(batch))

    fields = ["id", "L_gt"] + [length_field(temperature) for temperature in args.temperatures]
    table = [{field: done[sample.id][field] for field in fields} for sample in samples]
    write_json_atomic(args.output_path, table)
    side_file.unlink(missing_ok=True)
    print(f"wrote {len(table)} rows to {args.output_path}")
    return table


if __name__ == "__main__":
    run_cli(main)
