"""Length predictions for a serving stack: one JSON line per request of any request file of src.infer.

    python -m src.predict --data-path requests.jsonl --strategy proxy --predictor-path ckpts/proxy-minilm \\
        --output predictions.jsonl

The requests are read as src.infer reads them (prompts, Alpaca records, FastChat conversations, OpenAI batch lines;
src/common/request_file.py); each is predicted from its last user turn. Each line: {"id", "predicted_length",
"quantiles" (level -> length, for a predictor with quantiles), "rank"}, or {"id", "error"} for a request that cannot
run (an empty prompt, as src.infer says too). The rank orders the file's requests by predicted length, shortest first,
ties in file order, from 1: an engine that takes a per-request priority where lower runs first (vLLM's `priority`,
SGLang's) can use it as it is, or route on `predicted_length` and the quantiles.

Requests are predicted in chunks of `--chunk-size`, each appended to `OUTPUT.partial` and flushed to disk as it is
done, with a progress bar. An interrupted run keeps them: the same command resumes after the last complete line
(a line cut short by the interruption is dropped). When every request has its prediction, the ranks are added and
OUTPUT is written in one step; the partial file goes away. Resuming with other predictor settings is refused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

from .common.answers import OutputLock, read_complete_lines, read_run_settings
from .common.cli import HelpFormatter, check_output_file, check_outputs_are_not_inputs, check_range, run_cli
from .common.data import Sample, default_length_path
from .common.models import model_folder
from .common.request_file import check_request_file, read_requests
from .common.utils import UserError, partial_path, path_fingerprint, write_text_atomic
from .predictors.flags import add_predictor_arguments, check_predictor_arguments, predictor_context
from .predictors.registry import PREDICTORS, build_predictor, is_prediction_row
from .running.setup import add_model_arguments, attach_model_if_needed, check_model_arguments
from .scheduling.batches import clamp_prediction

# Settings that change the predictions: a partial file made under others cannot be resumed.
RESUME_KEYS = (
    "data_path",
    "strategy",
    "predictor_path",
    "max_length",
    "constant_length",
    "length_path",
    "model",
    "lora_path",
    "dtype",
    "load_format",
    "conv_template",
    "predictions_path",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--data-path", required=True, help="the requests: any request file of src.infer")
    parser.add_argument("--output", required=True, help="the JSON-lines file to write")
    parser.add_argument("--strategy", default="proxy", help=f"predictor: {', '.join(sorted(PREDICTORS))}")
    parser.add_argument("--max-length", type=int, default=512, help="predictions are clamped to [1, max length]")
    parser.add_argument("--chunk-size", type=int, default=1024, help="requests predicted and written at a time")
    parser.add_argument("--length-path", default=None, help="length file of gt; default: data path + -length")
    parser.add_argument("--lora-path", default=None, help="adapter of seqsch")
    add_model_arguments(parser)
    add_predictor_arguments(parser)
    args = parser.parse_args(argv)
    for flag, value in (
        ("--max-length", args.max_length),
        ("--chunk-size", args.chunk_size),
    ):
        check_range(flag, value, 1)
    check_predictor_arguments(args)
    if args.strategy not in PREDICTORS:
        raise UserError(f"unknown strategy {args.strategy!r}: choose from {', '.join(sorted(PREDICTORS))}")
    check_model_arguments(args, PREDICTORS[args.strategy].needs_model)
    check_output_file("--output", args.output)
    check_output_file("--output", partial_path(args.output))
    args.length_path = args.length_path or default_length_path(args.data_path)
    inputs = {"--data-path": args.data_path, "--length-path": args.length_path}
    inputs |= {"--predictor-path": args.predictor_path, "--predictions-path": args.predictions_path}
    inputs |= {"--model": model_folder(args.model), "--lora-path": args.lora_path}
    check_outputs_are_not_inputs({"--output": args.output}, inputs)
    return args


def settings_path(output: str) -> Path:
    return Path(f"{output}.partial.settings.json")


def prediction_row(sample_id: str, predicted: int, quantiles: list[float] | None, levels, max_length: int) -> dict:
    """One line: the prediction and, where the predictor has them, its quantiles, clamped like it to [1, max]."""
    row = {"id": sample_id, "predicted_length": predicted}
    if quantiles is not None:
        row["quantiles"] = {
            f"{level:g}": clamp_prediction(value, max_length) for level, value in zip(levels, quantiles, strict=True)
        }
    return row


def prompt_fingerprint(prompt: str) -> str:
    """A short hash of a prompt, kept with its prediction in the partial file, so that a resumed run knows the prompt
    it predicted is still the one in the data."""
    return hashlib.sha256(prompt.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def read_samples(path: str) -> tuple[list[Sample], dict[str, str], list[str]]:
    """The requests of a request file that can run, as samples in file order; those that cannot (id -> why); and
    every id in file order. A malformed file is refused here, before any predictor loads."""
    check_request_file(path)
    samples, refused, every_id = [], {}, []
    for request in read_requests(path):
        every_id.append(request.id)
        if request.problem is None:
            samples.append(Sample(request.id, request.prompt, None))
        else:
            refused[request.id] = request.problem
    return samples, refused, every_id


def ranked(rows: list[dict], order: list[str]) -> list[dict]:
    """Rows in file order, each with its rank by predicted length (1 = shortest; ties keep file order)."""
    by_id = {row["id"]: row for row in rows}
    position = {sample_id: index for index, sample_id in enumerate(order)}
    shortest_first = sorted(order, key=lambda sample_id: (by_id[sample_id]["predicted_length"], position[sample_id]))
    rank = {sample_id: index + 1 for index, sample_id in enumerate(shortest_first)}
    return [by_id[sample_id] | {"rank": rank[sample_id]} for sample_id in order]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with OutputLock(args.output):  # one run per output: a second one must not repair or append to the partial file
        return predict_all(args)


def check_resumable(done: list[dict], args, samples: list[Sample], settings: dict) -> None:
    """The kept predictions of an interrupted run continue only under its settings, for ids the data still has, of
    prompts it still asks."""
    partial, settings_file = partial_path(args.output), settings_path(args.output)
    order = [sample.id for sample in samples]
    earlier = read_run_settings(settings_file)
    if earlier != settings:
        raise UserError(
            f"{partial} holds {len(done)} predictions made with other settings ({earlier}): "
            "delete it, or rerun with those settings"
        )
    known = set(order)
    unknown = [row["id"] for row in done if row["id"] not in known]
    if unknown:
        raise UserError(f"{partial} has id {unknown[0]!r}, which {args.data_path} lacks: delete {partial}")
    asked = {sample.id: prompt_fingerprint(sample.prompt) for sample in samples}
    changed = [row["id"] for row in done if row.get("request") != asked[row["id"]]]
    if changed:
        raise UserError(
            f"{partial} predicted id {changed[0]!r} for a prompt that {args.data_path} no longer asks: restore "
            f"the data, or delete {partial} to predict anew"
        )
    print(f"resuming: {len(done)} of {len(order)} requests were predicted before")


def predict_all(args) -> dict:
    """Every request's prediction, continuing the partial file of an interrupted run with the same settings."""
    from tqdm import tqdm

    samples, refused, every_id = read_samples(args.data_path)
    order = [sample.id for sample in samples]
    settings = {key: getattr(args, key, None) for key in RESUME_KEYS}
    settings["predictor_config"] = path_fingerprint(args.predictor_path)  # its weights, not only its name
    partial, settings_file = partial_path(args.output), settings_path(args.output)
    done = read_complete_lines(partial, repair=True, is_row=is_prediction_row, what="a prediction line")
    if done:
        check_resumable(done, args, samples, settings)
    finished = {row["id"] for row in done}
    todo = [sample for sample in samples if sample.id not in finished]

    if todo:
        context = predictor_context(args)
        attach_model_if_needed(args, context, args.strategy)
        predictor = build_predictor(args.strategy, context)
        if not done:  # only once the predictor is built: a refused run leaves nothing behind
            partial.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(settings_file, json.dumps(settings) + "\n")
        levels = predictor.quantile_levels or None
        with open(partial, "a") as handle, tqdm(total=len(order), initial=len(done), unit="request") as progress:
            for start in range(0, len(todo), args.chunk_size):
                chunk = todo[start : start + args.chunk_size]
                predictions = predictor.predict(chunk)
                rows = predictor.quantile_rows
                for sample in chunk:
                    quantiles = rows[sample.id] if levels is not None else None
                    row = prediction_row(sample.id, predictions[sample.id], quantiles, levels, args.max_length)
                    row["request"] = prompt_fingerprint(sample.prompt)  # in the partial file only
                    handle.write(json.dumps(row) + "\n")
                    done.append(row)
                handle.flush()
                os.fsync(handle.fileno())  # a chunk on disk is a chunk that a resumed run will not redo
                progress.update(len(chunk))
    lines = ranked([{key: value for key, value in row.items() if key != "request"} for row in done], order)
    by_id = {row["id"]: row for row in lines} | {key: {"id": key, "error": why} for key, why in refused.items()}
    lines = [by_id[sample_id] for sample_id in every_id]  # error lines where their requests stand in the file
    write_text_atomic(args.output, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in lines))
    partial.unlink(missing_ok=True)
    settings_file.unlink(missing_ok=True)
    errors = f" and {len(refused)} error lines" if refused else ""
    print(f"{len(done)} predictions{errors} written to {args.output} (rank 1 = shortest predicted)")
    return {"rows": lines}


if __name__ == "__main__":
    run_cli(main)
