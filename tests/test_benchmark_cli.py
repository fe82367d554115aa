"""`python -m src.benchmark` end to end on the tiny model, and its answers to bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from src import benchmark
from src.common.cli import run_cli
from src.running.executor import BATCH_ENGINE_FIELDS, BATCH_TIMING_FIELDS

from .conftest import SMALL_LENGTHS, cli_args, write_json

RESULT_FIELDS = {
    "strategy",
    "vbs",
    "fcr",
    "num_samples",
    "throughput_samples_per_s",
    "average_length",
    "effective_token_ratio",
    "failure_ratio",
    "wall_time_s",
    "prediction_time_s",
    "generation_time_s",
    "generated_tokens",
    "token_slots",
    "batch_size",
    "group_size",
    "max_length",
    "temperature",
    "seed",
}


def base_args(tiny_model_dir, data, lengths, output):
    return cli_args(
        model=tiny_model_dir,
        device="cpu",
        data_path=data,
        replay_lengths=lengths,
        max_length=8,
        batch_size=2,
        group_size=6,
        output_json=output,
    )


def test_benchmark_end_to_end(tiny_model_dir, small_data, tmp_path, capsys):
    data, lengths = small_data
    output = tmp_path / "out.json"
    returned = benchmark.main(
        base_args(tiny_model_dir, data, lengths, output) + ["--strategies", "vanilla", "gt", "gt+vbs+fcr"]
    )
    saved = json.loads(output.read_text())
    assert saved == json.loads(json.dumps(returned))
    assert saved["args"]["strategies"] == ["vanilla", "gt", "gt+vbs+fcr"]
    results = saved["results"]
    assert [result["strategy"] for result in results] == ["vanilla", "gt", "gt+vbs+fcr"]
    for result in results:
        assert RESULT_FIELDS <= set(result)
        assert result["num_samples"] == 6
        assert [sample["id"] for sample in result["samples"]] == list(SMALL_LENGTHS)
        assert result["generated_tokens"] == sum(min(length, 8) for length in SMALL_LENGTHS.values())
        assert result["token_slots"] == sum(batch["steps"] * batch["size"] for batch in result["batches"])
        assert result["wall_time_s"] == pytest.approx(result["prediction_time_s"] + result["generation_time_s"])
        assert result["throughput_samples_per_s"] == pytest.approx(6 / result["wall_time_s"])
    # vanilla: data order, every batch to max length or its longest member: 8 + 6 + 8 steps of 2
    assert results[0]["token_slots"] == 44
    assert results[0]["average_length"] == pytest.approx(44 / 6)
    assert results[0]["effective_token_ratio"] == pytest.approx(28 / 44)  # 3 + 8 + 1 + 6 + 2 + 8 useful tokens
    # gt + VBS + FCR: every L_max is in the 50-token bucket (256 rows), so one batch of six capped at 8 steps
    assert results[2]["token_slots"] == 48 and results[2]["effective_token_ratio"] == pytest.approx(28 / 48)
    # gt sorted by L_max: (c1, e2), (a3, d6), (b10->8, f8)
    assert results[1]["token_slots"] == 2 * 2 + 6 * 2 + 8 * 2
    out = capsys.readouterr().out
    for line in ("Throughput:", "Average length:", "Effective token ratio:", "Failure ratio:", "speed-up"):
        assert line in out


def test_single_strategy_flags_as_upstream(tiny_model_dir, small_data, tmp_path):
    data, lengths = small_data
    output = tmp_path / "out.json"
    benchmark.main(base_args(tiny_model_dir, data, lengths, output) + ["--strategy", "gt", "--vbs", "--fcr"])
    (result,) = json.loads(output.read_text())["results"]
    assert (result["strategy"], result["vbs"], result["fcr"]) == ("gt+vbs+fcr", True, True)


def run_and_expect_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(benchmark.main, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_missing_data_file(tmp_path, capsys):
    err = run_and_expect_error(["--data-path", str(tmp_path / "nope.json")], capsys)
    assert "nope.json" in err


def test_malformed_data_file(tmp_path, capsys):
    broken = tmp_path / "broken.json"
    broken.write_text('[{"id": "1", "conversations": [')
    assert "not valid JSON" in run_and_expect_error(["--data-path", str(broken)], capsys)
    wrong_shape = write_json(tmp_path / "shape.json", [{"id": "1", "text": "hi"}])
    assert "line 1: no known shape" in run_and_expect_error(["--data-path", str(wrong_shape)], capsys)


def test_length_file_lacking_ids(small_data, tmp_path, capsys):
    data, _ = small_data
    partial = write_json(
        tmp_path / "partial-length.json", [{"id": "a", "L_gt": 1, "L_t0.0": 1, "L_t0.3": 1, "L_t0.5": 1, "L_t0.7": 1}]
    )
    err = run_and_expect_error(["--data-path", str(data), "--strategy", "gt", "--length-path", str(partial)], capsys)
    assert "lacks 5 id(s)" in err
    err = run_and_expect_error(["--data-path", str(data), "--replay-lengths", str(partial)], capsys)
    assert "partial-length.json" in err


def test_num_data_larger_than_data(small_data, capsys):
    data, _ = small_data
    assert "larger than the data" in run_and_expect_error(["--data-path", str(data), "--num-data", "7"], capsys)


def test_unknown_strategy(small_data, capsys):
    data, _ = small_data
    assert "unknown strategy 'magic'" in run_and_expect_error(["--data-path", str(data), "--strategy", "magic"], capsys)
    err = run_and_expect_error(["--data-path", str(data), "--strategies", "gt+sort"], capsys)
    assert "modifier 'sort'" in err


def test_model_that_will_not_load(small_data, tmp_path, capsys):
    data, _ = small_data
    empty = tmp_path / "empty-model"
    empty.mkdir()
    err = run_and_expect_error(["--data-path", str(data), "--model", str(empty)], capsys)
    assert "cannot load model" in err and "config.json" in err
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    assert "cannot load model" in run_and_expect_error(["--data-path", str(data), "--model", str(broken)], capsys)


def test_cli_exit_status_in_a_subprocess(tmp_path):
    """The real entry point: one line on stderr, status 2, no traceback."""
    completed = subprocess.run(
        [sys.executable, "-m", "src.benchmark", "--data-path", str(tmp_path / "missing.json")],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert completed.returncode == 2
    (line,) = completed.stderr.strip().splitlines()
    assert line.startswith(f"error: data file not found: {tmp_path / 'missing.json'} (pass --data-path")


def test_finished_strategies_survive_a_later_failure(tiny_model_dir, small_data, tmp_path, monkeypatch):
    data, lengths = small_data
    output = tmp_path / "out.json"
    real_run_strategy = benchmark.run_strategy

    def failing_second(strategy, *args, **kwargs):
        if strategy.predictor == "gt":
            raise RuntimeError("boom")
        return real_run_strategy(strategy, *args, **kwargs)

    output.write_text('{"an earlier": "complete result"}')
    command = base_args(tiny_model_dir, data, lengths, output) + ["--strategies", "vanilla", "gt"]
    monkeypatch.setattr(benchmark, "run_strategy", failing_second)
    with pytest.raises(RuntimeError):
        benchmark.main(command)
    assert output.read_text() == '{"an earlier": "complete result"}'  # a failed run replaces no complete file
    partial = tmp_path / "out.json.partial"
    saved = json.loads(partial.read_text())
    assert [result["strategy"] for result in saved["results"]] == ["vanilla"]

    # the same command again runs only what is missing, and then replaces the earlier file
    ran = []
    monkeypatch.setattr(
        benchmark,
        "run_strategy",
        lambda strategy, *a, **k: ran.append(strategy.label) or real_run_strategy(strategy, *a, **k),
    )
    finished = benchmark.main(command)
    assert ran == ["gt"]
    assert [result["strategy"] for result in json.loads(output.read_text())["results"]] == ["vanilla", "gt"]
    assert finished["results"][0] == saved["results"][0] and not partial.exists()


def test_a_partial_result_over_changed_inputs_is_not_continued(small_data, tmp_path, monkeypatch, capsys):
    """The same flags over a length file that changed since the interrupted run: its results are refused."""
    data, lengths = small_data
    output = tmp_path / "out.json"
    command = ["--dry-run", "--data-path", str(data), "--replay-lengths", str(lengths), "--output-json", str(output)]
    real_run_strategy = benchmark.run_strategy

    def failing_second(strategy, *args, **kwargs):
        if strategy.predictor == "gt":
            raise RuntimeError("boom")
        return real_run_strategy(strategy, *args, **kwargs)

    monkeypatch.setattr(benchmark, "run_strategy", failing_second)
    with pytest.raises(RuntimeError):
        benchmark.main([*command, "--strategies", "vanilla", "gt"])
    monkeypatch.setattr(benchmark, "run_strategy", real_run_strategy)
    rows = json.loads(lengths.read_text())
    rows[0]["L_t0.0"] += 1
    lengths.write_text(json.dumps(rows))
    capsys.readouterr()  # the first run's progress bars
    message = run_and_expect_error([*command, "--strategies", "vanilla", "gt"], capsys)
    assert "holds results of other flags or input files" in message and not output.exists()


def test_a_partial_result_of_other_flags_is_refused(tiny_model_dir, small_data, tmp_path, capsys):
    data, lengths = small_data
    output = tmp_path / "out.json"
    (tmp_path / "out.json.partial").write_text(json.dumps({"flags": {"max_length": 99}, "results": []}))
    message = run_and_expect_error(base_args(tiny_model_dir, data, lengths, output) + ["--strategy", "vanilla"], capsys)
    assert "holds results of other flags" in message and not output.exists()


def test_oracle_of_one_column(tiny_model_dir, small_data, tmp_path):
    data, lengths = small_data
    rows = json.loads(lengths.read_text())
    for row in rows:
        row["L_t0.7"] = 1  # L_max stays L_t0.0 here, so make the column choice visible through L_t0.7
    lengths.write_text(json.dumps(rows))
    output = tmp_path / "out.json"
    benchmark.main(base_args(tiny_model_dir, data, lengths, output) + ["--strategy", "gt", "--gt-field", "L_t0.7"])
    (result,) = json.loads(output.read_text())["results"]
    assert {sample["prediction"] for sample in result["samples"]} == {1}


def untimed(rows: list[dict]) -> list[dict]:
    """Sample rows without their finish time in seconds, which only real runs measure."""
    return [{key: value for key, value in row.items() if key != "latency_s"} for row in rows]


def test_dry_run_equals_the_engine(tiny_model_dir, small_data, tmp_path):
    """The model-free dry run goes through the same scheduler and metrics: every token figure is the engine's."""
    data, lengths = small_data
    strategies = ["--strategies", "vanilla", "gt", "gt+fcr", "gt+vbs+fcr", "constant+fcr+resume", "--group-size", "4"]
    strategies += ["--constant-length", "2"]  # every sample longer than 2 fails, and resumes from its KV cache
    real = benchmark.main(base_args(tiny_model_dir, data, lengths, tmp_path / "real.json") + strategies)
    dry = benchmark.main(base_args("no-such-model", data, lengths, tmp_path / "dry.json") + strategies + ["--dry-run"])
    token_fields = (
        "token_slots",
        "generated_tokens",
        "average_length",
        "effective_token_ratio",
        "failure_ratio",
        "truncated_ratio",
        "num_batches",
    )
    for real_result, dry_result in zip(real["results"], dry["results"], strict=True):
        assert {k: real_result[k] for k in token_fields} == {k: dry_result[k] for k in token_fields}
        # a real run's samples also carry their finish time in seconds
        assert untimed(real_result["samples"]) == dry_result["samples"]
        # the schedule's columns; a real batch also has its times and its prompts' share of the cache
        schedule = ("group", "recompute", "bucket", "size", "cap", "steps", "token_slots", "useful_tokens")
        assert [{k: b[k] for k in schedule} for b in real_result["batches"]] == [
            {k: b[k] for k in schedule} for b in dry_result["batches"]
        ]
        for real_batch, dry_batch in zip(real_result["batches"], dry_result["batches"], strict=True):
            # rows x cap, and a resumed batch's rows also hold the tokens they continue from
            if dry_batch["resumed_tokens"]:
                assert dry_batch["cache_tokens"] >= dry_batch["size"] * dry_batch["cap"] + dry_batch["resumed_tokens"]
            else:
                assert dry_batch["cache_tokens"] == dry_batch["size"] * dry_batch["cap"]
            assert real_batch["cache_tokens"] > dry_batch["cache_tokens"]
            assert real_batch["decode_steps_timed"] == real_batch["steps"] - 1  # the first token comes with prefill
            # the clock columns and the executor's
            assert set(real_batch) - set(dry_batch) == set(BATCH_TIMING_FIELDS) - {"elapsed_s"} | set(
                BATCH_ENGINE_FIELDS
            )
    resumed = real["results"][-1]
    assert resumed["recomputed_samples"] > 0 and sum(batch["kv_reused_tokens"] for batch in resumed["batches"]) > 0


def test_dry_run_needs_lengths_and_a_model_free_predictor(small_data, capsys):
    data, lengths = small_data
    assert "--replay-lengths" in run_and_expect_error(["--data-path", str(data), "--dry-run"], capsys)
    err = run_and_expect_error(
        ["--data-path", str(data), "--dry-run", "--replay-lengths", str(lengths), "--strategy", "po"], capsys
    )
    assert "needs a model" in err


@pytest.mark.parametrize("engine", ["transformers", "slots"])
def test_continuous_batching_on_the_engine(tiny_model_dir, small_data, tmp_path, engine):
    """Continuous batching, transformers' manager or the slots engine's refilled rows, returns one result per id at
    its replayed length, and its token columns equal the dry run's iteration model; admission by prediction sorts the
    queue."""
    data, lengths = small_data
    strategies = ["--strategies", "continuous", "continuous:gt", "--slots", "2", "--gt-field", "L_t0.0"]
    real_args = base_args(tiny_model_dir, data, lengths, tmp_path / "real.json") + ["--engine", engine]
    real = benchmark.main(real_args + strategies)
    dry = benchmark.main(base_args("no-such-model", data, lengths, tmp_path / "dry.json") + strategies + ["--dry-run"])
    for real_result, dry_result in zip(real["results"], dry["results"], strict=True):
        lengths_by_id = {sample["id"]: sample["length"] for sample in real_result["samples"]}
        assert lengths_by_id == {sample_id: min(length, 8) for sample_id, length in SMALL_LENGTHS.items()}
        for field in ("token_slots", "generated_tokens", "effective_token_ratio", "decode_steps"):
            assert real_result[field] == dry_result[field]
        assert untimed(real_result["samples"]) == dry_result["samples"]
        assert real_result["mean_latency_s"] > 0
        # the engine's resolved step settings (the manager's default speed), which the iteration model has none of
        expected_settings = {"engine": "slots"} if engine == "slots" else {"speed": "graphs"}
        assert expected_settings.items() <= real_result["continuous_settings"].items()
        assert dry_result["continuous_settings"] is None
    fcfs, ordered = real["results"]
    # by hand, 2 slots: FCFS a3 b8 | c1 -> d6 | e2 -> f8 finish at steps 3, 8, 4, 10, 10, 18;
    # shortest first c1 e2 | a3 d6 | b8 f8 finish at 1, 2, 4, 8, 12, 16
    assert (fcfs["decode_steps"], fcfs["token_slots"], fcfs["generated_tokens"]) == (18, 36, 28)
    assert (fcfs["mean_latency_steps"], fcfs["p90_latency_steps"]) == (pytest.approx(53 / 6), 18)
    assert (ordered["decode_steps"], ordered["token_slots"], ordered["generated_tokens"]) == (16, 32, 28)
    assert (ordered["mean_latency_steps"], ordered["p90_latency_steps"]) == (pytest.approx(43 / 6), 16)
    assert [sample["admitted"] for sample in fcfs["samples"]] == list(range(6))
    # group size 6: the whole queue by prediction; b's 10 is clamped to the max length 8 and ties with f,
    # and ties keep the data order
    admitted = {sample["id"]: sample["admitted"] for sample in ordered["samples"]}
    assert sorted(admitted, key=admitted.get) == ["c", "e", "a", "d", "b", "f"]


def test_continuous_engine_never_starts_under_inference_mode(tiny_model, monkeypatch):
    """On CUDA the engine's worker thread updates its static tensors outside inference mode, so tensors it made
    under inference mode crashed it ("Inplace update to inference tensor"); a CPU sees the mode it starts in."""
    import torch

    from src.engines.continuous import run_continuous

    model, tokenizer = tiny_model
    modes = []
    start_engine = model.continuous_batching_context_manager

    def recording(*args, **kwargs):
        modes.append((torch.is_inference_mode_enabled(), torch.is_grad_enabled()))
        return start_engine(*args, **kwargs)

    monkeypatch.setattr(model, "continuous_batching_context_manager", recording)
    outcome = run_continuous(
        model, tokenizer, ["x", "y"], {"x": [1, 500, 600], "y": [1, 700]}, 4, 2, replay={"x": 3, "y": 4}
    )
    assert modes == [(False, False)]
    assert outcome.lengths == {"x": 3, "y": 4}


def test_continuous_speeds_give_the_same_answers_and_say_what_ran(eos_model_dir):
    """Every --continuous-speed generates the same greedy answers (they change how the step runs, never what it
    computes), and each outcome names the settings the manager resolved: on a CPU no CUDA graphs, and a compiled
    step only when asked for."""
    from src.common.models import load_model
    from src.engines.continuous import run_continuous

    model, tokenizer, _ = load_model(str(eos_model_dir), "cpu", "float32")
    prompts = {"x": [1, 5, 6, 7, 8], "y": [1, 9, 10], "z": [1, 11, 12, 13]}
    outcomes = {
        speed: run_continuous(model, tokenizer, ["x", "y", "z"], prompts, 12, 2, speed=speed)
        for speed in ("plain", "graphs", "compiled")
    }
    assert len(set(outcomes["plain"].lengths.values())) > 1  # answers that end at different steps
    for outcome in outcomes.values():
        assert (outcome.lengths, outcome.texts) == (outcomes["plain"].lengths, outcomes["plain"].texts)
    settings = {speed: outcome.settings for speed, outcome in outcomes.items()}
    assert [settings[speed]["speed"] for speed in outcomes] == ["plain", "graphs", "compiled"]
    assert all(
        ran["cuda_graphs_varlen_decode"] == [False, False] and ran["attention"] == "sdpa" for ran in settings.values()
    )
    assert [settings[speed]["compile_varlen"] for speed in outcomes] == [None, None, "default"]
    assert model.config._attn_implementation == "sdpa"  # the manager gave the model its attention back


def test_continuous_strategy_flags(small_data, capsys):
    data, lengths = small_data
    common = ["--data-path", str(data), "--dry-run", "--replay-lengths", str(lengths), "--max-length", "8"]
    output = benchmark.main(common + ["--strategy", "continuous", "--order", "predicted", "--gt-field", "L_t0.0"])
    assert output["results"][0]["strategy"] == "continuous:gt"
    capsys.readouterr()
    assert "do not apply" in run_and_expect_error(common + ["--strategies", "continuous+vbs"], capsys)
    assert "unknown predictor" in run_and_expect_error(common + ["--strategies", "continuous:nope"], capsys)


def test_bucket_predictions_round_up_to_fifty(small_data):
    data, lengths = small_data
    common = ["--data-path", str(data), "--dry-run", "--replay-lengths", str(lengths), "--max-length", "60"]
    output = benchmark.main(common + ["--strategy", "gt", "--gt-field", "L_t0.0", "--bucket-predictions"])
    assert {sample["prediction"] for sample in output["results"][0]["samples"]} == {50}


def test_out_of_memory_back_off_changes_no_result(tiny_model_dir, small_data, tmp_path):
    """A batch that raises the real torch.OutOfMemoryError is split and retried; every sample's length and text
    equal the unsplit run's, the splits are counted, and the slots are charged as the pieces ran."""
    data, lengths = small_data
    strategies = ["--strategies", "vanilla", "gt+vbs+fcr", "--vbs-table", "50:4", "--batch-size", "4"]
    plain = benchmark.main(base_args(tiny_model_dir, data, lengths, tmp_path / "plain.json") + strategies)
    split = benchmark.main(
        base_args(tiny_model_dir, data, lengths, tmp_path / "split.json") + strategies + ["--inject-oom-above", "1"]
    )
    for plain_result, split_result in zip(plain["results"], split["results"], strict=True):
        assert plain_result["oom_splits"] == 0 and split_result["oom_splits"] > 0
        for field in ("generated_tokens", "failure_ratio", "recomputed_samples"):
            assert plain_result[field] == split_result[field]
        # latency in steps is not compared: the pieces of a split batch run one after another, so it grows
        unclocked = [
            [row | {"latency_steps": None} for row in untimed(result["samples"])]
            for result in (plain_result, split_result)
        ]
        assert unclocked[0] == unclocked[1]
        assert split_result["token_slots"] == sum(batch["token_slots"] for batch in split_result["batches"])
    # vanilla, batches of 4 in data order: (a3 b8 c1 d6) and (e2 f8) run whole take 8 x 4 + 8 x 2 = 48 slots;
    # cut down to single rows (nothing over 1 row fits) each sample pays only its own length, 28 slots in all
    assert plain["results"][0]["token_slots"] == 48 and split["results"][0]["token_slots"] == 3 + 8 + 1 + 6 + 2 + 8
    assert split["results"][0]["decode_steps"] == 28 and split["results"][0]["effective_token_ratio"] == 1.0
    # gt + VBS + FCR, table 50:4: (c1 e2 a3 d6) for 6 steps and (b8 f8) for 8 whole, 4 x 6 + 2 x 8 = 40; split, 28
    assert plain["results"][1]["token_slots"] == 40 and split["results"][1]["token_slots"] == 28


def test_two_processes_give_the_single_process_metrics(tiny_model_dir, tmp_path):
    """torchrun with 2 CPU processes (gloo) runs whole groups on each: every token figure, batch and sample
    equals one process's; only times and latencies (each process has its own clock) differ."""
    import random

    from .conftest import run_command, torchrun

    rng = random.Random(1)
    conversations = [
        {"id": f"s{index}", "conversations": [{"from": "human", "value": f"Tell me about the number {index}."}]}
        for index in range(24)
    ]
    data = write_json(tmp_path / "data.json", conversations)
    rows = [{"id": f"s{index}", "L_t0.0": rng.randint(1, 20), "L_t0.3": rng.randint(1, 20)} for index in range(24)]
    lengths = write_json(tmp_path / "lengths.json", rows)
    flags = cli_args(
        model=tiny_model_dir,
        device="cpu",
        data_path=data,
        replay_lengths=lengths,
        length_path=lengths,
        max_length=16,
        batch_size=4,
        group_size=8,  # 3 groups: process 0 runs groups 0 and 2, process 1 group 1
        vbs_table="50:8",
    )
    # gt predicts L_t0.3 while L_t0.0 is replayed, so FCR caps cut some samples short
    flags += ["--gt-field", "L_t0.3", "--strategies", "vanilla", "gt+fcr", "gt+vbs+fcr", "continuous"]
    one = benchmark.main(flags + ["--output-json", str(tmp_path / "one.json")])
    run_command(torchrun("src.benchmark", flags + ["--output-json", str(tmp_path / "two.json")]))
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["args"]["processes"] == 2
    one_static, two_static = one["results"][:3], two["results"][:3]
    assert one_static[1]["recomputed_samples"] > 0  # FCR's recompute path ran on both processes' groups
    fields = ["num_samples", "num_batches", "decode_steps", "token_slots", "generated_tokens", "average_length"]
    fields += ["effective_token_ratio", "failure_ratio", "recomputed_samples", "truncated_ratio", "oom_splits"]
    timed = {"latency_s", "latency_steps", "process", *BATCH_TIMING_FIELDS, *BATCH_ENGINE_FIELDS}
    for single, merged in zip(one_static, two_static, strict=True):
        assert merged["processes"] == 2 and len(merged["process_wall_times_s"]) == 2
        assert sum(merged["process_decode_steps"]) == single["decode_steps"] and min(merged["process_decode_steps"]) > 0
        assert {name: merged[name] for name in fields} == {name: single[name] for name in fields}
        untimed_rows = [{key: value for key, value in row.items() if key not in timed} for row in merged["samples"]]
        assert untimed_rows == [
            {key: value for key, value in row.items() if key not in timed} for row in single["samples"]
        ]
        shares = [row["process"] for row in merged["samples"]]
        assert (shares.count(0), shares.count(1)) == (16, 8)  # groups 0 and 2, and group 1: no sample twice
        batches = sorted(merged["batches"], key=lambda batch: batch["group"])  # stable: each group's order kept
        untimed_batches = [{key: value for key, value in batch.items() if key not in timed} for batch in batches]
        assert untimed_batches == [
            {key: value for key, value in b.items() if key not in timed} for b in single["batches"]
        ]
        # latency merges from every sample's own finish time, on its process's clock
        steps = [row["latency_steps"] for row in merged["samples"]]
        assert merged["mean_latency_steps"] == pytest.approx(sum(steps) / len(steps))
        assert merged["throughput_samples_per_s"] == pytest.approx(24 / max(merged["process_wall_times_s"]))
    # continuous batching: each process has its own slots, so only what was generated must agree
    assert two["results"][3]["generated_tokens"] == one["results"][3]["generated_tokens"]


def test_groups_are_shared_round_robin_and_never_split():
    from src.common.distributed import Processes

    samples = list(range(10))
    shares = [benchmark.share_groups(samples, 3, Processes(rank, 2)) for rank in range(2)]
    assert shares == [[0, 1, 2, 6, 7, 8], [3, 4, 5, 9]]
    with pytest.raises(benchmark.UserError, match="fewer than the 4 processes"):
        benchmark.share_groups(samples, 5, Processes(0, 4))


def test_dry_run_with_arrivals_reports_latency_from_each_arrival(small_data):
    data, lengths = small_data
    flags = cli_args(dry_run=True, data_path=data, replay_lengths=lengths, slots=1, arrival_rate=1, gt_field="L_t0.0")
    output = benchmark.main([*flags, "--aging", "1", "--strategies", "continuous", "continuous:gt"])
    fcfs, aged = output["results"]
    # by hand (tests/test_schedule.py): FCFS latencies 3 12 12 17 18 25; shortest first with aging 1: 3 2 2 9 21 25
    assert fcfs["mean_latency_steps"] == pytest.approx(87 / 6) and aged["mean_latency_steps"] == pytest.approx(62 / 6)
    assert {row["id"]: row["latency_steps"] for row in aged["samples"]} == {
        "a": 3,
        "b": 21,
        "c": 2,
        "d": 9,
        "e": 2,
        "f": 25,
    }
    assert [row["id"] for row in sorted(aged["samples"], key=lambda row: row["admitted"])] == list("acedbf")


def test_the_managers_cache_holds_as_many_of_the_longest_requests_as_there_are_slots():
    """The cache the manager is given: 4 slots of the longest request, 20 prompt tokens and 64 new ones. (What each
    speed asks of it is seen running, on a CPU, in test_continuous_speeds_give_the_same_answers_and_say_what_ran.)"""
    from src.engines.continuous import continuous_config

    config = continuous_config([10, 20], 64, 4, "plain")
    # ceil((20 + 64) / 64) = 2 pages a request, 4 requests, and one spare page
    assert (config.num_blocks, config.max_requests_per_batch, config.auto_switch_to_flash) == (9, 4, False)
