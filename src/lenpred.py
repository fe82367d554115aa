"""Record response lengths: run the model at the paper's four temperatures and write a length file.

    python -m src.lenpred                                   # upstream: Vicuna-7B on data/alpaca-train-10k.json
    python -m src.lenpred --model smollm2-135m --data-path data/demo.json

Output rows: {id, L_gt, L_t0.0, L_t0.3, L_t0.5, L_t0.7}, one per id, in data order. L_gt counts the
dataset's reference answer with the tokenizer (special tokens included, as upstream); L_tT counts the
generated tokens up to and including EOS. Finished batches go to `<output>.partial.jsonl` as they finish,
so an interrupted run started again with the same arguments resumes where it stopped.

Under torchrun or `accelerate launch` with K processes, process r takes batches r, r + K, ... and appends to
`<output>.partial.rank<r>.jsonl`; a run resumes from every partial file whatever K it ran with, and the main
process writes the one length file when all are done.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
from pathlib import Path

from .common.cli import (
    MAX_SEED,
    HelpFormatter,
    add_num_data_draw_argument,
    check_output_file,
    check_outputs_are_not_inputs,
    check_range,
    run_cli,
)
from .common.data import (
    PAPER_TRAIN_DATA,
    TEMPERATURES,
    default_length_path,
    length_field,
    load_conversations,
    select_samples,
)
from .common.distributed import Processes, start_processes
from .common.utils import UserError, path_fingerprint, set_seed, write_json_atomic
from .running.setup import add_model_arguments, check_model_arguments, load_model_with_engine


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--data-path", default=PAPER_TRAIN_DATA, help="FastChat conversation file")
    add_model_arguments(parser)
    parser.add_argument("--output-path", default=None, help="length file to write; default: data path + -length")
    parser.add_argument("--seed", type=int, default=42, help="seed of the sample draw and of sampling")
    add_num_data_draw_argument(parser)
    parser.add_argument("--batch-size", "--bs", type=int, default=16, help="prompts generated together")
    parser.add_argument("--max-length", type=int, default=512, help="most new tokens per response")
    parser.add_argument(
        "--temperatures", type=float, nargs="+", default=list(TEMPERATURES), help="one length column per temperature"
    )
    args = parser.parse_args(argv)
    for flag, value in (
        ("--batch-size", args.batch_size),
        ("--max-length", args.max_length),
        ("--num-data", args.num_data),
    ):
        check_range(flag, value, 1)
    check_range("--seed", args.seed, 0, MAX_SEED)
    for temperature in args.temperatures:
        check_range("--temperatures", temperature, 0)
    if args.output_path is None:
        args.output_path = default_length_path(args.data_path)
    check_output_file("--output-path", args.output_path)
    check_outputs_are_not_inputs({"--output-path": args.output_path}, {"--data-path": args.data_path})
    check_model_arguments(args)
    return args


def partial_path(output_path: str, processes: Processes | None = None) -> Path:
    """Where this process appends its finished rows: one file per process, so that no two write the same file."""
    if processes is None or not processes.distributed:
        return Path(f"{output_path}.partial.jsonl")
    return Path(f"{output_path}.partial.rank{processes.rank}.jsonl")


def partial_paths(output_path: str) -> list[Path]:
    """Every partial file of this output, whichever number of processes wrote it."""
    single = Path(f"{output_path}.partial.jsonl")
    ranked = sorted(single.parent.glob(f"{glob.escape(single.name[: -len('.jsonl')])}.rank*.jsonl"))
    return [path for path in [single, *ranked] if path.is_file()]


def run_identity(args: argparse.Namespace) -> dict:
    """What must match for a partial file to be resumed."""
    return {
        "data_path": os.path.abspath(args.data_path),
        "data": path_fingerprint(args.data_path),  # an edited file under the same name asks other prompts
        "model": args.model,
        "load_format": args.load_format,
        "conv_template": args.conv_template,
        "max_length": args.max_length,
        "temperatures": args.temperatures,
        "seed": args.seed,
        "num_data": args.num_data,
    }


def read_partial(path: Path, identity: dict) -> tuple[dict[str, dict], bool]:
    """Rows finished by an earlier run, and whether the file starts with its header; a line cut short by a
    kill is dropped (its batch runs again)."""
    if not path.is_file():
        return {}, False
    rows = {}
    has_header = False
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
                    f"{path} was written by a run with other arguments or another data file; rerun with those, or "
                    f"delete {path.name.split('.partial')[0]}.partial*.jsonl to start over"
                )
            has_header = True
            continue
        rows[str(record["id"])] = record
    return rows, has_header


def read_partials(output_path: str, identity: dict) -> dict[str, dict]:
    """The finished rows of every partial file of this output."""
    rows: dict[str, dict] = {}
    for path in partial_paths(output_path):
        rows.update(read_partial(path, identity)[0])
    return rows


def lock_output(output_path: str, processes: Processes):
    """Hold a shared lock on `<output>.lock` for the life of this process, after the main process has checked
    that no process of an earlier run still holds it. A second run on the same output could otherwise append to
    the same partial files: torchrun starts its workers in sessions of their own, so they outlive a launcher that
    was killed. The kernel drops the lock when a process dies, however it dies. Returns the open lock file."""
    import fcntl

    path = Path(f"{output_path}.lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a")  # noqa: SIM115 - held open until the process exits
    busy = False
    if processes.is_main:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            busy = True
    if processes.broadcast(busy):
        raise UserError(
            f"another src.lenpred run is still writing {output_path} (a worker of an earlier launch may have outlived "
            f"its launcher): wait for it to end or kill it, then run again"
        )
    # the main process turns its check into the run's shared lock; flock(2) does not promise that this is atomic,
    # so two runs started within the same instant could both pass, which the check does not try to prevent
    fcntl.flock(handle, fcntl.LOCK_SH)
    return handle


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
    processes = start_processes(args.device)
    args.device = processes.device(args.device)
    samples = select_samples(load_conversations(args.data_path), args.num_data, args.seed)
    lock = lock_output(args.output_path, processes)
    try:
        return record_lengths(args, processes, samples)
    finally:
        lock.close()  # the empty lock file stays: removing it would let a new run lock a file nobody checks


def record_lengths(args, processes: Processes, samples: list) -> list[dict]:
    """Resume from the partial files, generate this process's share, and (main process) write the length file."""
    identity = run_identity(args)
    done = read_partials(args.output_path, identity)
    processes.wait()  # every process has read the same partial files before any appends to its own
    todo = [sample for sample in samples if sample.id not in done]
    if done and processes.is_main:
        print(f"resuming: {len(done)} of {len(samples)} samples already in {args.output_path}.partial*.jsonl")
    # whole batches are shared out, so a batch holds the same prompts whatever the number of processes
    batches = processes.share(todo, args.batch_size)

    if batches:
        generate_lengths(args, batches, processes, identity, initial=len(done))
    processes.wait()

    if not processes.is_main:
        return []
    done = read_partials(args.output_path, identity)  # the rows every process wrote
    missing = [sample.id for sample in samples if sample.id not in done]
    if missing:  # an internal check: every process appended its share before the barrier above
        raise RuntimeError(f"{len(missing)} samples have no row in the partial files, e.g. {missing[0]}")
    fields = ["id", "L_gt"] + [length_field(temperature) for temperature in args.temperatures]
    table = [{field: done[sample.id][field] for field in fields} for sample in samples]
    write_json_atomic(args.output_path, table)
    for path in partial_paths(args.output_path):
        path.unlink(missing_ok=True)
    print(f"wrote {len(table)} rows to {args.output_path}")
    return table


def generate_lengths(args, batches, processes: Processes, identity: dict, initial: int) -> None:
    """Generate this process's batches at every temperature, appending each finished batch to its partial file."""
    from tqdm import tqdm

    loaded = load_model_with_engine(args)
    formatter, engine = loaded.formatter, loaded.engine
    side_file = partial_path(args.output_path, processes)
    _, has_header = read_partial(side_file, identity)
    header = None if has_header else {"run": identity}
    if header is not None and side_file.exists():
        side_file.unlink()  # half a header and nothing else: start the file afresh
    mine = sum(len(batch) for batch in batches)
    # one bar: the main process's share (the others' shares are the same size to within a batch)
    total, start = (mine, 0) if processes.distributed else (initial + mine, initial)
    description = f"lenpred (process 0 of {processes.count})" if processes.distributed else "lenpred"
    with tqdm(total=total, initial=start, desc=description, unit="sample", disable=not processes.is_main) as progress:
        for batch in batches:
            prompts = [formatter.encode(sample.prompt) for sample in batch]
            rows = [
                {"id": sample.id, "L_gt": len(loaded.tokenizer(sample.reference).input_ids) if sample.reference else 0}
                for sample in batch
            ]
            for temperature in args.temperatures:
                set_seed(args.seed)  # the same batch gets the same draws when a run resumes
                generated = engine.generate(prompts, args.max_length, temperature)
                for row, sample in zip(rows, generated, strict=True):
                    row[length_field(temperature)] = sample.length
            append_rows(side_file, rows, header)
            header = None
            progress.update(len(batch))


if __name__ == "__main__":
    run_cli(main)
