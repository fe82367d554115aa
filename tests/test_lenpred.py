"""`src.lenpred`: the length file format and resuming an interrupted run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from src import lenpred
from src.common.utils import UserError

from .conftest import SMALL_LENGTHS, cli_args


def args_for(tiny_model_dir, data, output):
    return cli_args(model=tiny_model_dir, device="cpu", data_path=data, output_path=output, max_length=4, batch_size=4)


def test_writes_one_row_per_id_in_data_order(tiny_model_dir, small_data, tmp_path):
    data, _ = small_data
    output = tmp_path / "lengths.json"
    lenpred.main(args_for(tiny_model_dir, data, output))
    rows = json.loads(output.read_text())
    assert [row["id"] for row in rows] == list(SMALL_LENGTHS)
    for row in rows:
        assert list(row) == ["id", "L_gt", "L_t0.0", "L_t0.3", "L_t0.5", "L_t0.7"]
        assert all(1 <= row[f"L_t{t}"] <= 4 for t in (0.0, 0.3, 0.5, 0.7))
        assert row["L_gt"] > 0
    assert not lenpred.partial_path(str(output)).exists()


def test_resumes_from_partial_file_without_duplicates(tiny_model_dir, small_data, tmp_path):
    data, _ = small_data
    output = tmp_path / "lengths.json"
    argv = args_for(tiny_model_dir, data, output)
    identity = lenpred.run_identity(lenpred.parse_args(argv))
    finished = {"id": "a", "L_gt": 99, "L_t0.0": 1, "L_t0.3": 2, "L_t0.5": 3, "L_t0.7": 4}
    side = lenpred.partial_path(str(output))
    # a run killed mid-way: header, one finished row, and half a line
    side.write_text(json.dumps({"run": identity}) + "\n" + json.dumps(finished) + '\n{"id": "b", "L_g')
    lenpred.main(argv)
    rows = json.loads(output.read_text())
    assert [row["id"] for row in rows] == list(SMALL_LENGTHS)
    assert rows[0] == finished  # kept, not generated again


def test_refuses_partial_file_of_other_arguments(tiny_model_dir, small_data, tmp_path):
    data, _ = small_data
    output = tmp_path / "lengths.json"
    lenpred.partial_path(str(output)).write_text(json.dumps({"run": {"max_length": 1}}) + "\n")
    with pytest.raises(UserError, match="other arguments"):
        lenpred.main(args_for(tiny_model_dir, data, output))


def test_a_run_killed_with_sigkill_resumes_to_the_same_file(tiny_model_dir, tmp_path):
    """SIGKILL mid-run, start again with the same arguments: the final file equals an uninterrupted run's."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from .conftest import write_json

    conversations = [
        {"id": f"k{index}", "conversations": [{"from": "human", "value": f"Count to {index} in words, please."}]}
        for index in range(24)
    ]
    data = write_json(tmp_path / "many.json", conversations)
    project = Path(__file__).resolve().parents[1]

    def flags(output):
        flags = cli_args(model=tiny_model_dir, device="cpu", data_path=data, output_path=output, max_length=24)
        return [*flags, "--batch-size", "2", "--temperatures", "0.0", "0.7"]

    def command(output):
        return [sys.executable, "-m", "src.lenpred", *flags(output)]

    reference = tmp_path / "reference.json"
    lenpred.main(flags(reference))  # in this process: the killed run's subprocess is what the test is about

    output = tmp_path / "killed.json"
    side = lenpred.partial_path(str(output))
    process = subprocess.Popen(command(output), cwd=project, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if side.is_file() and side.read_text().count("\n") >= 5:  # the header and a few finished rows
            break
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    if output.exists():
        pytest.skip("the run finished before it could be killed")
    assert process.returncode == -signal.SIGKILL and side.is_file()
    subprocess.run(command(output), cwd=project, check=True, capture_output=True)
    assert json.loads(output.read_text()) == json.loads(reference.read_text())
    assert not side.exists()


def many_prompts(tmp_path, count=40):
    """Prompts whose reference answers differ in length, so a row given to the wrong id shows in L_gt."""
    from .conftest import write_json

    conversations = [
        {
            "id": f"k{index}",
            "conversations": [
                {"from": "human", "value": f"Count to {index} in words, please."},
                {"from": "gpt", "value": " ".join(["word"] * (index + 1))},
            ],
        }
        for index in range(count)
    ]
    return write_json(tmp_path / "many.json", conversations)


def test_two_processes_write_the_single_process_file(eos_model_dir, tmp_path):
    """torchrun with 2 CPU processes (gloo): the same rows, ids and lengths as one process, and no partial files."""

    from .conftest import run_command, torchrun

    data = many_prompts(tmp_path, 24)
    flags = cli_args(model=eos_model_dir, device="cpu", data_path=data, max_length=16, batch_size=4)
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    lenpred.main([*flags, "--output-path", str(one)])  # in this process: one interpreter start fewer
    run_command(torchrun("src.lenpred", [*flags, "--output-path", str(two)]))
    rows = json.loads(one.read_text())
    assert json.loads(two.read_text()) == rows
    assert len({row["L_gt"] for row in rows}) == 24 and len({row["L_t0.0"] for row in rows}) > 1
    assert lenpred.partial_paths(str(two)) == []


def test_a_single_process_resumes_from_the_partial_files_of_two(tiny_model_dir, small_data, tmp_path):
    data, _ = small_data
    output = tmp_path / "lengths.json"
    argv = args_for(tiny_model_dir, data, output)
    header = json.dumps({"run": lenpred.run_identity(lenpred.parse_args(argv))}) + "\n"
    kept = {
        "a": {"id": "a", "L_gt": 91, "L_t0.0": 1, "L_t0.3": 2, "L_t0.5": 3, "L_t0.7": 4},
        "d": {"id": "d", "L_gt": 92, "L_t0.0": 4, "L_t0.3": 3, "L_t0.5": 2, "L_t0.7": 1},
    }
    for rank, sample_id in enumerate(kept):
        Path(f"{output}.partial.rank{rank}.jsonl").write_text(header + json.dumps(kept[sample_id]) + "\n")
    lenpred.main(argv)
    rows = {row["id"]: row for row in json.loads(output.read_text())}
    assert list(rows) == list(SMALL_LENGTHS)
    assert rows["a"] == kept["a"] and rows["d"] == kept["d"]
    assert lenpred.partial_paths(str(output)) == []


def test_a_second_run_on_an_output_still_being_written_is_refused(tiny_model_dir, small_data, tmp_path):
    """A worker that outlived its killed launcher still holds the output's lock: a new run says so and stops."""
    import fcntl

    data, _ = small_data
    output = tmp_path / "lengths.json"
    with open(f"{output}.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_SH)  # as a live process of an earlier run holds it
        with pytest.raises(UserError, match="still writing"):
            lenpred.main(args_for(tiny_model_dir, data, output))
    assert not output.exists()
    lenpred.main(args_for(tiny_model_dir, data, output))  # once that process is gone, the run goes ahead
    assert output.exists()


def test_two_processes_killed_with_sigkill_resume_to_the_same_file(eos_model_dir, tmp_path):
    """SIGKILL the launcher and both workers mid-run, launch again: the file equals an uninterrupted run's, and
    the relaunch generated only what was missing."""
    import os
    import signal
    import subprocess
    import time

    from benchmarks.lenpred_resume import child_pids

    from .conftest import PROJECT, run_command, torchrun

    data = many_prompts(tmp_path)
    flags = cli_args(model=eos_model_dir, device="cpu", data_path=data, max_length=24, batch_size=2)
    flags += ["--temperatures", "0.0", "0.7"]
    reference = tmp_path / "reference.json"
    lenpred.main([*flags, "--output-path", str(reference)])  # in this process: one interpreter start fewer

    output = tmp_path / "killed.json"
    command = torchrun("src.lenpred", [*flags, "--output-path", str(output)])
    process = subprocess.Popen(
        command, cwd=PROJECT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        written = [path.read_text().count("\n") for path in lenpred.partial_paths(str(output))]
        if len(written) == 2 and min(written) >= 3:  # both processes have finished a batch or more
            break
        time.sleep(0.01)
    workers = child_pids(process.pid)
    for pid in [process.pid, *workers]:  # the launcher and its workers (each in a session of its own), as a
        os.kill(pid, signal.SIGKILL)  # machine failure would
    process.wait()
    assert len(workers) == 2
    if output.exists():
        pytest.skip("the run finished before it could be killed")
    assert len(lenpred.partial_paths(str(output))) == 2
    identity = lenpred.run_identity(lenpred.parse_args([*flags, "--output-path", str(output)]))
    kept = len(lenpred.read_partials(str(output), identity))
    assert 0 < kept < 40
    shares = [set(lenpred.read_partial(path, identity)[0]) for path in lenpred.partial_paths(str(output))]
    assert len(shares) == 2 and all(shares) and not shares[0] & shares[1]  # each process did its own batches
    relaunch = run_command(command)
    assert f"resuming: {kept} of 40 samples" in relaunch.stdout
    assert json.loads(output.read_text()) == json.loads(reference.read_text())
    assert lenpred.partial_paths(str(output)) == []
