"""The cost model: seconds of static and continuous runs worked out by hand, the named profiles against the runs they
describe, and `--device-profile` on the benchmark."""

import json

import pytest

from src import benchmark, infer
from src.scheduling.batches import Batch, ScheduleConfig
from src.scheduling.continuous import simulate_continuous
from src.scheduling.cost_model import (
    DeviceCosts,
    cache_tokens_beyond,
    continuous_run_seconds,
    load_profiles,
    static_run_seconds,
)
from src.scheduling.schedule import ExecutedBatch, RunRecord, replay_executor, run_schedule
from src.scheduling.vbs_choice import StepCosts

from .conftest import PAPER_DATA, cli_args
from .test_benchmark_cli import base_args, run_and_expect_error

# a step of 1 row costs 1 s, of 2 rows 1.5 s; 0.01 s per row per cache token past 20; 1 ms per prompt token
COSTS = DeviceCosts(StepCosts({1: 1.0, 2: 1.5}, 0.01, 20), 0.001)


def test_cache_tokens_beyond_counts_each_step_past_the_base():
    assert cache_tokens_beyond(10, 8, 5) == 0 + 0 + 0 + 1 + 2  # caches of 8, 9, 10, 11, 12 tokens
    assert cache_tokens_beyond(10, 12, 3) == 2 + 3 + 4
    assert cache_tokens_beyond(10, 5, 3) == 0
    assert cache_tokens_beyond(10, 12, 0) == 0


def test_a_static_batch_pays_its_padded_prefill_and_its_longest_member():
    config = ScheduleConfig(batch_size=2, sort=False)
    record = run_schedule(["a", "b"], {"a": 1, "b": 1}, config, replay_executor({"a": 3, "b": 5}))
    # prefill: 2 rows x 20 (the longer prompt) x 1 ms; 4 decode steps of 2 rows (the prefill made token 1) at 1.5 s;
    # caches of 21 ... 24 tokens read 1 + 2 + 3 + 4 tokens past 20 per row, at 0.01 s, on 2 rows
    expected = 0.04 + 4 * 1.5 + 10 * 0.01 * 2
    assert static_run_seconds(record, COSTS, {"a": 10, "b": 20}) == pytest.approx(expected)


def test_a_resumed_member_brings_its_tokens_and_a_split_batch_runs_in_pieces():
    resumed = Batch(("a", "b"), 3, 0, recompute=True, resume_from=(15, 0))
    whole = ExecutedBatch(resumed, {"a": 2, "b": 3}, {"a": True, "b": True})
    # a's context is 5 + 15 = 20 tokens: 2 rows prefilled to 20, 2 steps of 2 rows from caches of 21 and 22
    assert static_run_seconds(RunRecord([whole], {}), COSTS, {"a": 5, "b": 10}) == pytest.approx(
        0.04 + 2 * 1.5 + (1 + 2) * 0.01 * 2
    )
    split = ExecutedBatch(Batch(("a", "b"), 3, 0), {"a": 2, "b": 3}, {"a": True, "b": True}, parts=(("a",), ("b",)))
    # one row each: a prefills 5 and decodes 1 step, b prefills 10 and decodes 2; no cache passes 20 tokens
    assert static_run_seconds(RunRecord([split], {}), COSTS, {"a": 5, "b": 10}) == pytest.approx(
        0.005 + 1.0 + 0.010 + 2 * 1.0
    )


def test_a_continuous_run_pays_each_iteration_at_the_rows_decoding():
    record = simulate_continuous(["a", "b", "c"], {"a": 2, "b": 3, "c": 2}, slots=2, max_length=512)
    # a and b start together: a decodes in iteration 2, b in 2 and 3; c takes a's row, is prefilled in iteration 3
    # and decodes in 4. Iterations 2, 3, 4 decode 2, 1 and 1 rows; three prefills of 10 tokens
    prompts = {"a": 10, "b": 10, "c": 10}
    assert continuous_run_seconds(record, COSTS, prompts) == pytest.approx(0.03 + 1.5 + 1.0 + 1.0)


def test_fewer_rows_than_measured_cost_the_smallest_measured_step():
    assert StepCosts({16: 0.009, 64: 0.0105}, 0.0).seconds(1, 64) == 0.009


def test_every_profile_names_its_source():
    profiles = load_profiles()
    assert {"cpu", "h200", "a100"} <= set(profiles)
    for profile in profiles.values():
        assert profile.source and profile.steps.base and profile.prefill_per_token >= 0


def dry_run(tmp_path, profile, *strategies, num_data=128):
    output = tmp_path / f"{profile}.json"
    argv = ["--dry-run", "--data-path", str(PAPER_DATA / "alpaca-val-10k.json")]
    argv += ["--replay-lengths", str(PAPER_DATA / "alpaca-val-10k-length.json"), "--num-data", str(num_data)]
    benchmark.main([*argv, "--device-profile", profile, "--strategies", *strategies, "--output-json", str(output)])
    return {result["strategy"]: result for result in json.loads(output.read_text())["results"]}


def test_the_h200_profile_gives_the_seconds_of_the_compiled_h200_run(tmp_path):
    """docs/GPU.md's compiled engine on the H200, 128 val samples, L_t0.0: 5.808 samples/s vanilla, 10.355
    gt+vbs+fcr, 9.789 gt. The profile holds that run's step costs; its prefill and the model must make the rest."""
    results = dry_run(tmp_path, "h200", "vanilla", "gt+vbs+fcr", "gt")
    for strategy, measured in (("vanilla", 5.808), ("gt+vbs+fcr", 10.355), ("gt", 9.789)):
        estimated = 128 / results[strategy]["estimated_seconds"]
        assert estimated == pytest.approx(measured, rel=0.10), strategy
        assert results[strategy]["device_profile"] == "h200"


def test_the_a100_profile_gives_the_papers_two_throughputs(tmp_path):
    """The A100 profile is fitted to the paper's 1.39 (vanilla) and 2.69 samples/s (oracle + VBS + FCR) over its
    1024 val samples, so the dry run of those commands gives them back."""
    results = dry_run(tmp_path, "a100", "vanilla", "gt+vbs+fcr", num_data=1024)
    assert 1024 / results["vanilla"]["estimated_seconds"] == pytest.approx(1.39, rel=0.01)
    assert 1024 / results["gt+vbs+fcr"]["estimated_seconds"] == pytest.approx(2.69, rel=0.01)


def test_a_real_run_measures_its_profile_and_reports_the_estimate(tiny_model_dir, small_data, tmp_path, capsys):
    data, lengths = small_data
    output = tmp_path / "out.json"
    argv = base_args(tiny_model_dir, data, lengths, output) + ["--strategies", "vanilla", "continuous:gt"]
    saved = benchmark.main([*argv, "--device-profile", "measure"])
    costs = saved["args"]["device_costs"]
    assert costs["name"] == "measure" and set(costs["base_seconds_per_step"]) == {"1", "2"}  # batch size 2
    assert [result["device_profile"] for result in saved["results"]] == ["measure", "measure"]
    out = capsys.readouterr().out
    assert "device profile measure: ms per decode step by rows" in out
    assert out.count("Estimated: ") == 2 and "(measured " in out


def test_measuring_needs_a_model(small_data, capsys):
    data, lengths = small_data
    argv = ["--data-path", str(data), "--dry-run", "--replay-lengths", str(lengths), "--device-profile", "measure"]
    assert "--device-profile measure" in run_and_expect_error(argv, capsys)


def test_infer_estimates_its_plan_and_file_order_by_hand(tiny_model_dir, tmp_path, small_data, capsys):
    """Replayed lengths a3 b10 c1 d6 e2 f8, 2 rows, one queue in file order. Rows decoding by iteration (a request
    of length L ending at f decodes in f - L + 2 ... f): a ends at 3, b at 10, c at 4 (its prefill is all), d at
    10, e at 12, f at 18, so iterations 2-3 and 6-10 and 12 decode 2 rows, 4-5 and 13-18 one row: 8 steps of 2
    rows and 8 of one. File order: batches (a,b), (c,d), (e,f) decode 9, 5 and 7 steps of 2 rows."""
    data, lengths = small_data
    flags = {"model": tiny_model_dir, "max_length": 12, "batch_size": 2, "replay_lengths": lengths}
    output = tmp_path / "queue.jsonl"
    summary = infer.main(
        cli_args(input=data, output=output, strategy="continuous", device_profile="h200", engine="slots", **flags)
    )
    prompts = {row["id"]: row["prompt_tokens"] for row in map(json.loads, output.read_text().splitlines())}
    profile = load_profiles()["h200"]
    one_row, two_rows = profile.steps.seconds(1, 64), profile.steps.seconds(2, 64)  # flat in the context
    prefill = profile.prefill_per_token
    queue = 8 * two_rows + 8 * one_row + prefill * sum(prompts.values())
    padded = sum(max(prompts[first], prompts[second]) for first, second in (("a", "b"), ("c", "d"), ("e", "f")))
    file_order = (9 + 5 + 7) * two_rows + prefill * 2 * padded
    assert summary["device_profile"] == "h200"
    assert summary["estimated_generation_s"] == pytest.approx(queue)
    assert summary["data_order_estimated_s"] == pytest.approx(file_order)
    assert "cost model (h200): generation estimated" in capsys.readouterr().err
