"""`--vbs-table auto`: the cost model and the table choice without a device, and one calibrated run."""

from __future__ import annotations

import pytest

from src import benchmark
from src.scheduling.batches import PAPER_VBS_TABLE, ScheduleConfig, plan_first_batches
from src.scheduling.vbs_choice import StepCosts, choose_schedule, estimate_seconds

from .test_benchmark_cli import base_args
from .test_schedule import random_case


def estimate(ids, predictions, config, costs):
    total = 0.0
    for group, first in enumerate(range(0, len(ids), config.group_size)):
        batches = plan_first_batches(ids[first : first + config.group_size], predictions, config, group)
        total += estimate_seconds(batches, predictions, 64, costs)
    return total


# A 7B model on a GPU: steps bound by reading the weights, and a cache of 256 x (64 + 50) tokens at most
GPU_LIKE = StepCosts(
    {size: 0.02 + 0.0001 * size for size in (1, 2, 4, 8, 16, 32, 64, 128, 256)}, 0.0, kv_token_budget=256 * 114
)
CPU_LIKE = StepCosts({size: 0.01 + 0.004 * size for size in (1, 2, 4, 8, 16, 32, 64)}, 1e-7, largest_batch=64)


def test_step_costs_interpolate_and_extrapolate():
    costs = StepCosts({1: 1.0, 4: 4.0}, 0.5, context=10)
    assert costs.seconds(2, 10) == pytest.approx(2.0)
    assert costs.seconds(8, 10) == pytest.approx(8.0)  # per slot as at the largest measured size
    assert costs.seconds(4, 12) == pytest.approx(4.0 + 0.5 * 4 * 2)


@pytest.mark.parametrize("costs", [GPU_LIKE, CPU_LIKE], ids=["gpu-like", "cpu-like"])
def test_chosen_schedule_is_never_estimated_slower_than_paper_or_plain_sorting(costs):
    ids, predictions, _ = random_case(1, size=512)
    config = ScheduleConfig(fcr=True)
    chosen = choose_schedule(ids, predictions, config, costs, 64)
    paper = ScheduleConfig(fcr=True, vbs=True, vbs_table=PAPER_VBS_TABLE)
    assert estimate(ids, predictions, chosen, costs) <= estimate(ids, predictions, paper, costs)
    sizes = chosen.vbs_table.values() if chosen.vbs else [chosen.batch_size]
    assert max(sizes) <= costs.largest_batch and chosen.fcr
    if chosen.vbs:  # every bucket's batches fit in memory
        assert all(costs.fits(size, 64 + bucket) for bucket, size in chosen.vbs_table.items())


def test_the_cheapest_schedule_by_hand():
    """A step costs 1 s for one row and 2 s for two: two rows of 10 and 20 steps cost 10 + 20 = 30 s one at a time,
    20 x 2 = 40 s together, so each 50-token bucket gets batches of one."""
    costs = StepCosts({1: 1.0, 2: 2.0}, 0.0)
    predictions = {"a": 10, "b": 20}
    chosen = choose_schedule(["a", "b"], predictions, ScheduleConfig(fcr=True, batch_size=2), costs, 64)
    assert chosen.vbs and chosen.vbs_table == {50: 1}
    assert estimate(["a", "b"], predictions, chosen, costs) == pytest.approx(30.0)


def test_flat_step_cost_gives_the_paper_shape():
    """Where a step costs about the same at any batch size, short buckets get larger batches than long ones."""
    ids, predictions, _ = random_case(2, size=1024)
    chosen = choose_schedule(ids, predictions, ScheduleConfig(fcr=True, group_size=1024), GPU_LIKE, 64)
    table = chosen.vbs_table
    assert chosen.vbs and table[50] >= 128 and table[max(table)] <= 32


def test_benchmark_with_auto_table(tiny_model_dir, small_data, tmp_path):
    data, lengths = small_data
    argv = base_args(tiny_model_dir, data, lengths, tmp_path / "auto.json")
    output = benchmark.main(argv + ["--strategies", "gt+vbs+fcr", "--vbs-table", "auto", "--no-warmup"])
    result = output["results"][0]
    assert result["num_samples"] == 6 and result["generated_tokens"] == 28
    assert output["args"]["vbs_calibration"]["base_seconds_per_step"]["1"] > 0


def test_benchmark_plans_from_the_calibrated_costs(tiny_model_dir, small_data, tmp_path, monkeypatch):
    """With GPU-like costs (flat in the batch size, a cache of 256 x 114 tokens) every prediction of the tiny run
    lies in the 50 bucket and one batch of all six is cheapest: 8 steps x 6 rows."""
    import src.running.vbs_calibration

    monkeypatch.setattr(src.running.vbs_calibration, "timed_calibration", lambda *args: (GPU_LIKE, 0.0))
    data, lengths = small_data
    argv = base_args(tiny_model_dir, data, lengths, tmp_path / "auto.json")
    output = benchmark.main(argv + ["--strategies", "gt+vbs+fcr", "--vbs-table", "auto", "--no-warmup"])
    result = output["results"][0]
    assert result["vbs_table"] == {"50": 8} and result["token_slots"] == 48
