"""Conversation files and length files, joined by id; the upstream way of drawing samples."""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path

from .utils import UserError, open_text, project_path, read_json, resolve_json_path

# The paper's Alpaca files, shipped in data/ as .json.gz and read under these plain names (utils.resolve_json_path).
PAPER_TRAIN_DATA = project_path("data/alpaca-train-10k.json")
PAPER_VAL_DATA = project_path("data/alpaca-val-10k.json")

# The four temperatures at which the paper records response lengths (one home for them).
TEMPERATURES = (0.0, 0.3, 0.5, 0.7)


def length_field(temperature: float) -> str:
    """The length file's column for a temperature: 0.7 -> L_t0.7."""
    return f"L_t{temperature}"


@dataclass(frozen=True)
class Sample:
    id: str
    prompt: str  # the human turn
    reference: str | None  # the dataset's answer, if any


def json_stem(path: str | Path) -> str:
    """The path without its `.json` or `.json.gz` ending: the base that derived file names extend."""
    path = str(path)
    for ending in (".json.gz", ".json"):
        if path.endswith(ending):
            return path[: -len(ending)]
    return path


def default_length_path(data_path: str | Path) -> str:
    """Upstream's convention: `x.json` -> `x-length.json`. Always the plain name, which is what a writer
    (src.lenpred) writes; readers also find the shipped `x-length.json.gz` under it (utils.resolve_json_path)."""
    return f"{json_stem(data_path)}-length.json"


def load_conversations(path: str | Path) -> list[Sample]:
    """A FastChat conversation file, a list of {id, conversations: [{from: human, value}, {from: gpt, value}]} (the
    paper's data), or any request file that src.infer reads (src.common.request_file), each sample one prompt."""
    hint = " (pass --data-path; data/README.md says where the paper's files come from)"
    if not resolve_json_path(path).is_file():
        raise UserError(f"data file not found: {resolve_json_path(path)}{hint}")
    if not _is_json_list(path):
        return samples_of_requests(path)
    records = read_json(path, "data file", hint)
    if not isinstance(records, list) or not records:
        raise UserError(f"data file {path} must be a non-empty JSON list of conversations")
    if not any(isinstance(record, dict) and "conversations" in record for record in records):
        return samples_of_requests(path)
    samples, seen = [], set()
    for index, record in enumerate(records):
        try:
            sample_id = str(record["id"])
            turns = record["conversations"]
            prompt = turns[0]["value"]
            reference = turns[1]["value"] if len(turns) > 1 else None
        except (KeyError, IndexError, TypeError):
            raise UserError(
                f"data file {path}: record {index} is not in FastChat format "
                '({"id": ..., "conversations": [{"from": "human", "value": ...}, ...]})'
            ) from None
        if not isinstance(prompt, str):
            raise UserError(f"data file {path}: record {index} (id {sample_id}) has a non-text prompt")
        if sample_id in seen:
            raise UserError(f"data file {path}: id {sample_id} appears twice; ids must be unique")
        seen.add(sample_id)
        samples.append(Sample(sample_id, prompt, reference))
    return samples


def _is_json_list(path: str | Path) -> bool:
    """Whether the file's first character that is not white space opens a JSON list (else: JSON lines). A file that
    cannot be read as text counts as a list, so that read_json names what is wrong with it."""
    try:
        with open_text(resolve_json_path(path)) as handle:
            for line in handle:
                if line.strip():
                    return line.lstrip().startswith("[")
    except (UnicodeDecodeError, OSError, EOFError, zlib.error):
        return True
    return False


def samples_of_requests(path: str | Path) -> list[Sample]:
    """The samples of a request file in any of src.infer's shapes: each request's prompt, refused (naming the id)
    where src.infer would write an error line instead, or where a request holds more than one turn, which a sample
    (one prompt through the conversation template) cannot carry. A record's own cap, sampling and stop strings are
    src.infer's: a sample runs under the command's flags."""
    from .request_file import check_request_file, read_requests

    check_request_file(path)  # malformed records and repeated ids, refused naming the line
    samples = []
    for request in read_requests(path):
        problem = request.problem
        if problem is None and len(request.messages) > 1:
            problem = f"{len(request.messages)} turns: a sample is one prompt (src.infer answers conversations)"
        if problem is not None:
            raise UserError(f"data file {path}, line {request.line} (id {request.id}): {problem}")
        samples.append(Sample(request.id, request.prompt, None))
    return samples


# the columns of a length file that hold lengths: L_gt, L_t0.0, ..., L_max
LENGTH_PREFIX = "L_"


def load_length_file(path: str | Path, fields: tuple[str, ...] = ()) -> dict[str, dict]:
    """A length file: a list of {id, L_gt, L_t0.0, ...} rows, returned as id -> row.

    Every row must carry `fields` as non-negative integers."""
    rows = read_json(path, "length file")
    if not isinstance(rows, list):
        raise UserError(f"length file {path} must be a JSON list of {{id, L_gt, L_t0.0, ...}} rows")
    table = {}
    for index, row in enumerate(rows):
        if not isinstance(row, dict) or "id" not in row:
            raise UserError(f"length file {path}: row {index} has no id")
        sample_id = str(row["id"])
        if sample_id in table:
            raise UserError(f"length file {path}: id {sample_id} appears twice; ids must be unique")
        for field in fields:
            if not is_length(row.get(field)):
                raise UserError(f"length file {path}: row {index} (id {sample_id}) has no integer {field}")
        for field, value in row.items():  # every length column, asked for or not: a bad one would skew a metric
            if field.startswith(LENGTH_PREFIX) and not is_length(value):
                raise UserError(
                    f"length file {path}: id {sample_id} has {field} = {json.dumps(value)}; a length is a whole "
                    "number of tokens, at least 0"
                )
        table[sample_id] = row
    return table


def is_length(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def require_ids(table: dict, ids: list[str], path: str | Path) -> None:
    """Every sample must have a row: a partial join would silently change what is measured."""
    missing = [sample_id for sample_id in ids if sample_id not in table]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise UserError(
            f"length file {path} lacks {len(missing)} id(s) of the data ({shown}); "
            "use the length file recorded for this data file"
        )


def load_replay_lengths(path: str | Path | None, field_name: str, ids: list[str]) -> dict[str, int] | None:
    """--replay-lengths: each of `ids` with its recorded length in column `field_name` (every id must have a row);
    None when no file is given."""
    if not path:
        return None
    table = load_length_file(path, (field_name,))
    require_ids(table, ids, path)
    return {sample_id: int(table[sample_id][field_name]) for sample_id in ids}


def temperature_fields(row: dict) -> list[str]:
    """The row's length columns, `L_t<temperature>` (the paper records four; a row may hold fewer)."""
    return [key for key in row if key.startswith("L_t")]


def max_over_temperatures(row: dict) -> int:
    """L_max: the largest recorded length over the temperatures, the paper's prediction target and `gt` oracle."""
    return max(int(row[field]) for field in temperature_fields(row))


def load_max_lengths(path: str | Path) -> dict[str, int]:
    """id -> L_max of a length file; every row needs at least one integer L_t<temperature> field."""
    table = load_length_file(path)
    for sample_id, row in table.items():
        fields = temperature_fields(row)
        if not fields or not all(isinstance(row[f], int) and not isinstance(row[f], bool) for f in fields):
            raise UserError(f"length file {path}: id {sample_id} has no integer L_t<temperature> fields")
    return {sample_id: max_over_temperatures(row) for sample_id, row in table.items()}


def select_samples(samples: list[Sample], num_data: int | None, seed: int) -> list[Sample]:
    """Upstream's draw, so runs compare with the paper's: np.random.seed(seed); permutation[:num_data].
    Without num_data, every sample in file order."""
    if num_data is None:
        return list(samples)
    if num_data < 1:
        raise UserError(f"--num-data must be at least 1, got {num_data}")
    if num_data > len(samples):
        raise UserError(f"--num-data {num_data} is larger than the data ({len(samples)} samples)")
    import numpy as np

    np.random.seed(seed)
    order = np.random.permutation(len(samples))
    return [samples[int(index)] for index in order[:num_data]]
