"""One writer per output: while a run holds an output, a second run on it is refused with the holder's pid before it
reads, repairs or appends anything; a killed holder leaves nothing that stops the next run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from src import infer, predict
from src.common.answers import OutputLock
from src.common.cli import run_cli
from src.common.utils import UserError

from .conftest import PROJECT

# a complete answer line, then one a kill cut short: a run that went on would cut the second off
ANSWERS = '{"id": "r1", "text": "Hi.", "generated_tokens": 2}\n{"id": "r2", "te'

HOLD_THE_LOCK = """
import sys, time
from src.common.answers import OutputLock
lock = OutputLock(sys.argv[1]).__enter__()
print("locked", flush=True)
time.sleep(120)
"""


def test_a_lock_is_exclusive_and_removed_on_exit(tmp_path):
    output = tmp_path / "answers.jsonl"
    with OutputLock(output):
        assert (tmp_path / "answers.jsonl.lock").read_text() == f"{os.getpid()}\n"
        with pytest.raises(UserError, match=rf"answers.jsonl is being written by another run \(pid {os.getpid()}\)"):
            OutputLock(output).__enter__()
    assert not (tmp_path / "answers.jsonl.lock").exists()
    (tmp_path / "answers.jsonl.lock").write_text("12345\n")  # left by a killed run: nobody holds it
    with OutputLock(output):
        assert (tmp_path / "answers.jsonl.lock").read_text() == f"{os.getpid()}\n"


def test_infer_on_an_output_another_process_writes_is_refused_and_changes_nothing(tmp_path, capsys):
    (tmp_path / "requests.jsonl").write_text('{"id": "r1", "prompt": "Say hi."}\n{"id": "r2", "prompt": "Bye."}\n')
    output = tmp_path / "answers.jsonl"
    output.write_text(ANSWERS)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_THE_LOCK, str(output)], cwd=PROJECT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        argv = ["--input", str(tmp_path / "requests.jsonl"), "--output", str(output), "--strategy", "vanilla"]
        with pytest.raises(SystemExit) as stopped:
            run_cli(infer.main, argv)
    finally:
        holder.kill()
        holder.wait()
    assert stopped.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"answers.jsonl is being written by another run (pid {holder.pid})" in line
    assert output.read_text() == ANSWERS  # the cut line is the holder's to finish: not cut off by the refused run
    assert not (tmp_path / "answers.jsonl.settings.json").exists()
    with OutputLock(output):  # the killed holder's lock went with it
        pass


def test_predict_waits_for_no_one_once_the_holder_is_gone(small_data, tmp_path):
    data, _ = small_data
    output = tmp_path / "predictions.jsonl"
    argv = ["--data-path", str(data), "--strategy", "gt", "--output", str(output)]
    with OutputLock(output), pytest.raises(UserError, match="being written by another run"):
        predict.main(argv)
    assert not output.exists() and not (tmp_path / "predictions.jsonl.partial").exists()
    rows = predict.main(argv)["rows"]
    assert [json.loads(line)["id"] for line in output.read_text().splitlines()] == [row["id"] for row in rows]
    assert sorted(path.name for path in tmp_path.iterdir() if path.name.startswith("predictions")) == [
        "predictions.jsonl"
    ]


def test_a_benchmark_leaves_a_result_file_another_run_writes_alone(small_data, tmp_path):
    """Two benchmarks on one --output-json would each overwrite the partial file the other keeps its finished
    strategies in: the second is refused while the first holds it, and runs once it is gone."""
    from src import benchmark

    data, lengths = small_data
    folder = tmp_path / "results"
    folder.mkdir()
    output = folder / "r.json"
    (folder / "r.json.partial").write_text("{}")  # the holder's, mid-run: not read, not replaced
    argv = ["--dry-run", "--data-path", str(data), "--replay-lengths", str(lengths), "--strategies", "vanilla", "gt"]
    argv += ["--output-json", str(output)]
    with OutputLock(output, "--output-json"), pytest.raises(UserError, match="--output-json .* another run"):
        benchmark.main(argv)
    assert (folder / "r.json.partial").read_text() == "{}" and not output.exists()
    (folder / "r.json.partial").unlink()
    assert [result["strategy"] for result in benchmark.main(argv)["results"]] == ["vanilla", "gt"]
    assert sorted(path.name for path in folder.iterdir()) == ["r.json"]


@pytest.mark.parametrize("command", ["train_lora", "train_proxy"])
def test_a_training_folder_another_run_writes_is_refused_before_anything_loads(command, small_data, tmp_path):
    """Two trainings into one --output_dir would resume from the same checkpoints and each swap its result in: the
    second is refused, naming the holder, before it reads the folder; the lock sits beside the folder, not in it."""
    from src import train_lora, train_proxy

    data, _ = small_data
    folder = tmp_path / "out"
    (folder / "checkpoint-2").mkdir(parents=True)  # the holder's, mid-run: not read, not resumed
    main = {"train_lora": train_lora.main, "train_proxy": train_proxy.main}[command]
    argv = ["--data_path", str(data), "--output_dir", f"{folder}/"]  # a trailing slash names the same folder
    argv += ["--model_name_or_path", "smollm2-135m"] if command == "train_lora" else []
    with OutputLock(folder, "--output_dir"):
        with pytest.raises(UserError, match="--output_dir .*out.* another run"):
            main(argv)
        assert sorted(path.name for path in tmp_path.iterdir() if path.name.startswith("out")) == ["out", "out.lock"]
    assert sorted(path.name for path in folder.iterdir()) == ["checkpoint-2"]


def test_answers_left_in_a_process_file_are_merged_by_the_next_run_whatever_the_name(eos_model_dir, tmp_path):
    """A torchrun run killed during its merge leaves answers in `<output>.rank1.partial`: the next run finds every
    request answered and merges them (the file found by its exact name, though the output's name has glob
    characters), so the output holds every answer once."""
    from tests.test_infer import answers_by_id, run_infer, write_requests

    requests, output = write_requests(tmp_path / "requests.jsonl"), tmp_path / "answers[1].jsonl"
    run_infer(eos_model_dir, requests, output, strategy="vanilla", device="cpu")
    lines = output.read_text().splitlines(keepends=True)
    output.write_text("".join(lines[:6]))  # the merge was cut: four answers still in the other process's file
    (tmp_path / "answers[1].jsonl.rank1.partial").write_text("".join(lines[6:]))
    (tmp_path / "answers[1].jsonl.rank2.partial.old").write_text(lines[0])  # not a process's file: left alone
    assert run_infer(eos_model_dir, requests, output, strategy="vanilla", device="cpu")["requests"] == 0
    assert sorted(output.read_text().splitlines(keepends=True)) == sorted(lines)
    assert len(answers_by_id(output)) == len(lines) == 10
    assert sorted(path.name for path in tmp_path.iterdir() if ".rank" in path.name) == [
        "answers[1].jsonl.rank2.partial.old"
    ]


def test_a_resumed_run_refuses_answers_to_questions_the_input_no_longer_asks(eos_model_dir, tmp_path):
    """Each answer records what its request asked: after an edit of one prompt, or a record added in front of ids
    that are line numbers, the next run is refused before the model loads, naming the id, and the answers stay."""
    from tests.test_infer import QUESTIONS, run_infer

    requests, output = tmp_path / "requests.jsonl", tmp_path / "answers.jsonl"
    requests.write_text("".join(json.dumps({"prompt": text}) + "\n" for text in QUESTIONS[:4]))  # ids 1 to 4
    run_infer(eos_model_dir, requests, output, strategy="vanilla", device="cpu")
    answered = output.read_text()
    assert run_infer(eos_model_dir, requests, output, strategy="vanilla", device="cpu")["requests"] == 0
    edited = QUESTIONS[:2] + ["What is 3 + 3?"] + QUESTIONS[3:4]
    requests.write_text("".join(json.dumps({"prompt": text}) + "\n" for text in edited))
    with pytest.raises(UserError, match="answers id '3' as it was asked before"):
        run_infer(eos_model_dir, requests, output, strategy="vanilla", device="cpu")
    shifted = ["Say hi."] + QUESTIONS[:4]  # id 1 is now another question, and id 5 a new one
    requests.write_text("".join(json.dumps({"prompt": text}) + "\n" for text in shifted))
    with pytest.raises(UserError, match="answers id '1' as it was asked before"):
        run_infer(eos_model_dir, requests, output, strategy="vanilla", device="cpu")
    assert output.read_text() == answered


def test_redo_changed_answers_the_edited_requests_anew_and_keeps_the_rest(eos_model_dir, tmp_path):
    """With --redo-changed, a rerun after an edit drops the answers of the edited requests (every process's file
    included) and answers them as they are asked now; the other answers stay as they were, each id once."""
    from tests.test_infer import QUESTIONS, answers_by_id, run_infer

    requests, output = tmp_path / "requests.jsonl", tmp_path / "answers.jsonl"
    requests.write_text("".join(json.dumps({"prompt": text}) + "\n" for text in QUESTIONS[:4]))  # ids 1 to 4
    run_infer(eos_model_dir, requests, output, strategy="vanilla", device="cpu")
    before = answers_by_id(output)
    lines = output.read_text().splitlines(keepends=True)
    output.write_text("".join(line for line in lines if json.loads(line)["id"] != "4"))
    (tmp_path / "answers.jsonl.rank1.partial").write_text(next(line for line in lines if '"id": "4"' in line))
    edited = QUESTIONS[:2] + ["What is 3 + 3?", "Say hi."]  # ids 3 and 4 ask something else now
    requests.write_text("".join(json.dumps({"prompt": text}) + "\n" for text in edited))
    summary = run_infer(eos_model_dir, requests, output, strategy="vanilla", device="cpu", redo_changed=True)
    assert summary["requests"] == 2
    after = answers_by_id(output)
    assert sorted(after) == ["1", "2", "3", "4"] and not (tmp_path / "answers.jsonl.rank1.partial").exists()
    assert after["1"] == before["1"] and after["2"] == before["2"]
    fresh = tmp_path / "fresh.jsonl"
    run_infer(eos_model_dir, requests, fresh, strategy="vanilla", device="cpu")
    assert {key: after[key] for key in ("3", "4")} == {key: answers_by_id(fresh)[key] for key in ("3", "4")}
    assert after["3"]["request"] != before["3"]["request"]


def test_a_full_disk_is_one_line_and_the_rerun_finishes_the_answers(eos_model_dir, tmp_path, capsys, monkeypatch):
    """A disk that fills while answers are written stops the run with one line that says so (exit status 1); the
    answers written before it are kept, and the same command, once there is room, ends with every answer once, as an
    uninterrupted run gives them."""
    import errno

    from src.common.answers import AnswerWriter
    from tests.test_infer import answers_by_id, run_infer, write_requests

    requests = write_requests(tmp_path / "requests.jsonl")
    whole, output = tmp_path / "whole.jsonl", tmp_path / "answers.jsonl"
    run_infer(eos_model_dir, requests, whole, strategy="vanilla", device="cpu")
    flush, flushes = AnswerWriter.flush, []

    def fill_the_disk(self):  # the second chunk gets half a line onto the disk, as a write into a full disk does
        flushes.append(1)
        if len(flushes) == 2 and self.pending:
            chunk, self.pending = self.pending, []
            self.handle.write(chunk[0][:10])
            self.handle.flush()
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        flush(self)

    argv = ["--input", str(requests), "--output", str(output), "--model", str(eos_model_dir), "--device", "cpu"]
    argv += ["--max-length", "24", "--batch-size", "3", "--strategy", "vanilla"]
    with monkeypatch.context() as patch, pytest.raises(SystemExit) as stopped:
        patch.setattr(AnswerWriter, "flush", fill_the_disk)
        run_cli(infer.main, argv)
    assert stopped.value.code == 1
    (line,) = [text for text in capsys.readouterr().err.splitlines() if text.startswith("error")]
    assert line.startswith(f"error: the disk is full writing {output}") and "run the same command again" in line
    assert 0 < len(answers_by_id(output)) < 10
    run_cli(infer.main, argv)
    assert answers_by_id(output) == answers_by_id(whole)


def test_output_order_input_rewrites_the_lines_in_the_inputs_order_byte_for_byte(tmp_path):
    """The finished output in the input's order: each line's bytes unchanged (an answer with non-ASCII text too), an
    id the input no longer asks after the rest in its file order; a file already in order is left as it is."""
    from src.common.answers import finish_output

    output = tmp_path / "answers.jsonl"
    lines = [
        '{"id": "c", "text": "trois"}\n',
        '{"id": "old", "text": "x"}\n',
        '{"id": "a", "text": "un \u00e9t\u00e9"}\n',
    ]
    lines.append('{"id": "b", "text": "deux"}\n')
    output.write_text("".join(lines), encoding="utf-8")
    finish_output(str(output), ["a", "b", "c"])
    assert output.read_text(encoding="utf-8") == "".join([lines[2], lines[3], lines[0], lines[1]])
    stamp = output.stat().st_mtime_ns
    finish_output(str(output), ["a", "b", "c"])
    assert output.stat().st_mtime_ns == stamp  # already in order: not written again
