"""Answer files: one JSON line per request, keyed by id, appended as requests finish and kept through a kill.

A line is {"id", "text", "prompt_tokens", "generated_tokens", "finish_reason", "predicted_length", "attempts"}, or
{"id", "error"} for a request that could not run, each with the "request" fingerprint of what it answered where the
writer is given them (src.infer). `finish_reason` is "stop" when the answer ended (EOS), "length"
when it reached its cap. `attempts` counts the batches it ran in (more than one when FCR stopped it at its predicted
length and ran it again). Lines are written in chunks (one batch's finished requests), each flushed to disk, so a
kill loses at most the batch that was running; a line the kill cut short is dropped when the file is read again.
"""

from __future__ import annotations

import fcntl
import gzip
import json
import os
import zlib
from pathlib import Path

from .openai_batch import recorded_request
from .utils import GZIP_SUFFIX, UserError

FINISH_STOP, FINISH_LENGTH = "stop", "length"


def answer_row(
    sample_id: str,
    text: str | None,
    prompt_tokens: int,
    generated_tokens: int,
    finished: bool,
    predicted_length: int,
    attempts: int,
) -> dict:
    return {
        "id": sample_id,
        "text": text,
        "prompt_tokens": prompt_tokens,
        "generated_tokens": generated_tokens,
        "finish_reason": FINISH_STOP if finished else FINISH_LENGTH,
        "predicted_length": predicted_length,
        "attempts": attempts,
    }


def error_row(sample_id: str, message: str) -> dict:
    return {"id": sample_id, "error": message}


def read_complete_lines(path: Path, repair: bool = False, is_row=None, what: str = "an answer line") -> list[dict]:
    """The rows of every complete line of a JSON-lines file that a run appends to ([] when there is none). The last
    line, if a kill cut it short (no newline), is dropped; with `repair` the file is cut back to the complete lines,
    so that appending continues a clean file. A bad line that ends in a newline, or that another line follows, is
    damage, not a kill: it is refused, naming the line, and the file is left as it is. `is_row(row)`: what else a row
    must satisfy besides being a JSON object with a text id."""
    if not path.is_file():
        return []
    compressed = path.name.endswith(GZIP_SUFFIX)  # a shipped file (read only): a run never appends to one
    if compressed and repair:
        raise ValueError(f"{path}: a compressed file is read, never repaired")
    rows, kept_bytes = [], 0
    try:
        with gzip.open(path, "rb") if compressed else open(path, "rb") as handle:  # streamed: it can be large
            for number, raw in enumerate(handle, start=1):
                try:
                    row = json.loads(raw)
                    valid = isinstance(row, dict) and isinstance(row.get("id"), str) and (is_row is None or is_row(row))
                except ValueError:
                    valid = False
                if not valid or not raw.endswith(b"\n"):
                    # a kill cuts the last line before its newline: a complete bad line, or one with a line after
                    # it, is damage (or a file that is not this run's), never cut off
                    if (not valid and raw.endswith(b"\n")) or handle.read(1):
                        raise UserError(
                            f"{path} line {number} is not {what}: the file is damaged; move it away to start over"
                        )
                    break
                rows.append(row)
                kept_bytes += len(raw)
    except (gzip.BadGzipFile, EOFError, zlib.error):
        raise UserError(f"{path} is not a complete gzip file: make or download it again") from None
    if repair and kept_bytes != path.stat().st_size:
        with open(path, "r+b") as handle:
            handle.truncate(kept_bytes)
    return rows


def read_run_settings(path: Path):
    """The settings an earlier run recorded beside its output: None without the file, "unreadable" for a damaged one
    (which matches no settings, so that the run is refused rather than continued)."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        return "unreadable"


class AnswerWriter:
    """Appends rows to an answer file: `add` buffers, `flush` writes the buffered lines and syncs them to disk.
    `fingerprints` (id -> the request's fingerprint): each row records its request's as "request"; `openai_output`
    (an `openai_batch.OpenAIBatchOutput`): the rows of OpenAI batch lines are written in OpenAI's output shape."""

    def __init__(self, path: Path, fingerprints: dict[str, str] | None = None, openai_output=None):
        self.path, self.fingerprints, self.openai_output = Path(path), fingerprints, openai_output
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
        self.pending: list[str] = []
        self.written = 0

    def add(self, row: dict) -> None:
        if self.fingerprints is not None:
            row = {**row, "request": self.fingerprints[row["id"]]}
        if self.openai_output is not None and row["id"] in self.openai_output.endpoints:
            row = self.openai_output.line(row)  # an OpenAI batch line is answered in the shape of OpenAI's output
        self.pending.append(json.dumps(row, ensure_ascii=False) + "\n")

    def flush(self) -> None:
        if not self.pending:
            return
        # taken before it is written: a flush interrupted after the write (Ctrl-C during the sync) must not write
        # the same lines again when close() flushes on the way out
        chunk, self.pending = self.pending, []
        self.handle.write("".join(chunk))
        self.handle.flush()
        os.fsync(self.handle.fileno())  # a chunk on disk is a chunk that a rerun will not redo
        self.written += len(chunk)

    def close(self) -> None:
        self.flush()
        self.handle.close()

    def __enter__(self) -> AnswerWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class OutputLock:
    """One writer per output: an exclusive advisory lock (`flock`) on `<output>.lock`, held from before the output is
    read for a resume until the run ends, when the file is removed (the system drops the lock of a killed run, whose
    file the next run then takes over). A second run on the same output is refused, naming the holder's pid."""

    def __init__(self, output: str | Path, flag: str = "--output"):
        self.path, self.output, self.flag = Path(f"{output}.lock"), output, flag
        self.handle = None

    def __enter__(self) -> OutputLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while self.handle is None:
            handle = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - closed by __exit__
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                handle.close()
                raise UserError(
                    f"{self.flag} {self.output} is being written by another run (pid {holder}): wait for it to end, "
                    f"or choose another {self.flag}"
                ) from None
            if not self._still_named(handle):  # its holder removed it as we opened it: lock the file there now
                handle.close()
                continue
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            self.handle = handle
        return self

    def _still_named(self, handle) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            return False

    def __exit__(self, *exc_info) -> None:
        if self.handle is not None:
            self.path.unlink(missing_ok=True)  # removed while locked, so no later run locks a file no longer named
            self.handle.close()
            self.handle = None


def lock_output(output: str, processes, flag: str = "--output") -> OutputLock | None:
    """The main process holds the output's lock for the whole run; when another run holds it, every process stops
    with the same line."""
    lock, refusal = None, None
    if processes.is_main:
        try:
            lock = OutputLock(output, flag).__enter__()
        except UserError as error:
            refusal = str(error)
    refusal = processes.broadcast(refusal)
    if refusal:
        raise UserError(refusal)
    return lock


def finish_output(output: str, order: list[str] | None = None) -> None:
    """The other processes' answers appended to the output; then, given the input's `order` of ids (--output-order
    input), the output rewritten in that order (answers to ids the input no longer asks last), beside itself and
    renamed into place. Memory holds each line's place in the file, not the lines: the rewrite reads them back one
    at a time."""
    from .utils import atomic_file

    merge_rank_files(output)
    if order is None or not Path(output).is_file():
        return
    position = {sample_id: index for index, sample_id in enumerate(order)}
    places = []  # (its place in `order`, its place in the file, offset, bytes) of each line
    with open(output, "rb") as handle:
        offset = 0
        for number, line in enumerate(handle):
            places.append((position.get(json.loads(line)["id"], len(position)), number, offset, len(line)))
            offset += len(line)
    ordered = sorted(places)
    if [place[1] for place in ordered] == list(range(len(places))):
        return
    with open(output, "rb") as source, atomic_file(output) as target:
        for _, _, offset, size in ordered:
            source.seek(offset)
            target.write(source.read(size))


def write_answer_file(path: str | Path, rows: list[dict]) -> None:
    """A whole answer file at once (src.benchmark's answers), replacing any earlier one in one step."""
    from .utils import write_text_atomic

    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def answer_rows(result: dict, finals: dict, prompt_lengths: dict | None) -> list[dict]:
    """src.benchmark --answers-dir: this process's answer lines of a static strategy, from the final results that
    run_schedule told."""
    rows = []
    for sample in result["samples"]:
        if sample["id"] in finals:
            final, attempts = finals[sample["id"]]
            prompt_tokens = (prompt_lengths or {}).get(sample["id"], 0)
            rows.append(
                answer_row(
                    final.id, final.text, prompt_tokens, final.length, final.finished, sample["prediction"], attempts
                )
            )
    return rows


def keep_answers(folder: str, label: str, rows: list[dict], ids: list[str]) -> str:
    """DIR/LABEL.jsonl, in data order, written in one step."""
    order = {sample_id: index for index, sample_id in enumerate(ids)}
    path = Path(folder) / f"{label.replace(':', '-')}.jsonl"
    write_answer_file(path, sorted(rows, key=lambda row: order[row["id"]]))
    return str(path)


def rank_path(output: str, rank: int) -> Path:
    """Where process `rank` appends: the output itself for the main process, a file beside it for the others."""
    return Path(output) if rank == 0 else Path(f"{output}.rank{rank}.partial")


def rank_paths(output: str) -> list[Path]:
    """The output and every other process's file of an earlier or this run."""
    path = Path(output)
    prefix, suffix = f"{path.name}.rank", ".partial"
    others = []  # by exact name: a glob of the user's file name would read its [, ] and * as patterns
    if path.parent.is_dir():
        for entry in path.parent.iterdir():
            rank = entry.name.removeprefix(prefix).removesuffix(suffix)
            if entry.name == f"{prefix}{rank}{suffix}" and rank.isdigit():
                others.append((int(rank), entry))
    return [path, *(entry for _, entry in sorted(others))]


def settings_path(output: str) -> Path:
    return Path(f"{output}.settings.json")


def answered_ids(output: str, repair: bool) -> set[str]:
    """Ids with a complete line in the output or a process's file."""
    return set(answered_rows(output, repair))


def answered_rows(output: str, repair: bool = False) -> dict[str, dict]:
    """The complete lines of the output and of every process's file, by id."""
    return {row["id"]: row for path in rank_paths(output) for row in read_complete_lines(path, repair)}


def changed_answers(kept: dict[str, dict], fingerprints: dict[str, str]) -> list[str]:
    """The ids of kept answers (`answered_rows`) that answered their request as it was asked before, not as the input
    asks it now (the fingerprint each recorded): an edited prompt, or ids by line number shifted by an added record.
    In the output's order."""
    return [
        sample_id
        for sample_id, row in kept.items()
        if sample_id in fingerprints and recorded_request(row) != fingerprints[sample_id]
    ]


def refuse_changed_answers(changed: list[str], output: str, input_path: str) -> None:
    if changed:
        raise UserError(
            f"{output} answers id {changed[0]!r} as it was asked before, and {input_path} now asks something else "
            f"there ({len(changed)} such ids): restore the input, pass --redo-changed to answer them anew, or choose "
            "another --output"
        )


def drop_answers(output: str, ids: list[str]) -> None:
    """The output and the processes' files without the answers of `ids`, each written beside itself and renamed into
    place: a kill leaves the old file or the new one."""
    from .utils import write_text_atomic

    dropped = set(ids)
    for path in rank_paths(output):
        if not path.is_file():
            continue
        with open(path, encoding="utf-8") as handle:
            lines = handle.readlines()
        kept = [line for line in lines if json.loads(line)["id"] not in dropped]
        if len(kept) < len(lines):
            write_text_atomic(path, "".join(kept))


def merge_rank_files(output: str) -> None:
    """The main process appends the other processes' lines to the output, then removes their files."""
    others = rank_paths(output)[1:]
    if not others:
        return
    with AnswerWriter(Path(output)) as writer:
        present = {row["id"] for row in read_complete_lines(Path(output))}
        for path in others:
            for row in read_complete_lines(path):
                if row["id"] not in present:
                    writer.add(row)
                    present.add(row["id"])
    for path in others:
        path.unlink()
