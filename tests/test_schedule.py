"""The scheduler and the metrics, without a model."""

from __future__ import annotations

import random

import pytest

from src.scheduling.batches import (
    PAPER_VBS_TABLE,
    ScheduleConfig,
    bucket_of,
    parse_vbs_table,
    plan_first_batches,
    plan_recompute,
)
from src.scheduling.continuous import admission_order, simulate_continuous
from src.scheduling.metrics import compute_continuous_metrics, compute_metrics
from src.scheduling.schedule import replay_executor, run_schedule

from .conftest import SMALL_LENGTHS


def random_case(seed: int, size: int = 300, max_length: int = 512):
    rng = random.Random(seed)
    ids = [f"id{index}" for index in range(size)]
    rng.shuffle(ids)
    # a long-tailed mix like Alpaca's: many short answers, some at the cap
    predictions = {sample_id: min(max_length, max(1, int(rng.lognormvariate(4.8, 0.8)))) for sample_id in ids}
    actual = {sample_id: max(1, int(predictions[sample_id] * rng.uniform(0.6, 1.5))) for sample_id in ids}
    return ids, predictions, actual


CONFIGS = [
    ScheduleConfig(sort=False),
    ScheduleConfig(),
    ScheduleConfig(fcr=True),
    ScheduleConfig(vbs=True),
    ScheduleConfig(vbs=True, fcr=True),
    ScheduleConfig(vbs=True, fcr=True, group_size=100, batch_size=8),
]


def test_bucket_rounds_up_to_fifty():
    assert [bucket_of(length) for length in (1, 49, 50, 51, 100, 101, 512)] == [50, 50, 50, 100, 100, 150, 550]


@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("seed", range(5))
def test_each_id_scheduled_once_per_group_and_caps_cover_predictions(config, seed):
    ids, predictions, _ = random_case(seed)
    for group, start in enumerate(range(0, len(ids), config.group_size)):
        group_ids = ids[start : start + config.group_size]
        batches = plan_first_batches(group_ids, predictions, config, group)
        scheduled = [sample_id for batch in batches for sample_id in batch.ids]
        assert sorted(scheduled) == sorted(group_ids)
        for batch in batches:
            assert 1 <= batch.max_new_tokens <= config.max_length
            if config.fcr:
                assert all(batch.max_new_tokens >= predictions[sample_id] for sample_id in batch.ids)
            else:
                assert batch.max_new_tokens == config.max_length


def test_vanilla_keeps_data_order_and_sorting_is_stable():
    ids = ["x", "y", "z", "w"]
    predictions = {"x": 30, "y": 10, "z": 30, "w": 10}
    vanilla = plan_first_batches(ids, predictions, ScheduleConfig(sort=False, batch_size=2))
    assert [batch.ids for batch in vanilla] == [("x", "y"), ("z", "w")]
    ordered = plan_first_batches(ids, predictions, ScheduleConfig(batch_size=2, fcr=True))
    assert [batch.ids for batch in ordered] == [("y", "w"), ("x", "z")]
    assert [batch.max_new_tokens for batch in ordered] == [10, 30]


def test_vbs_batch_sizes_follow_the_table():
    # 600 samples predicted in the 50 bucket, 300 in the 100 bucket, 40 at 512: no remainders to merge
    predictions = {f"s{index}": 20 for index in range(512)}
    predictions.update({f"m{index}": 90 for index in range(256)})
    predictions.update({f"l{index}": 512 for index in range(32)})
    config = ScheduleConfig(vbs=True, fcr=True, group_size=10_000)
    batches = plan_first_batches(list(predictions), predictions, config)
    assert [(batch.bucket, len(batch.ids), batch.max_new_tokens) for batch in batches] == [
        (50, 256, 50),
        (50, 256, 50),
        (100, 128, 100),
        (100, 128, 100),
        (550, 16, 512),
        (550, 16, 512),
    ]


def test_vbs_small_remainder_moves_up_unless_last_bucket():
    # bucket 50: 256 + 10 -> the 10 move up into bucket 150 (bucket 100 is empty); 150's batch size is 64
    predictions = {f"s{index}": 40 for index in range(266)}
    predictions.update({f"m{index}": 140 for index in range(60)})
    config = ScheduleConfig(vbs=True, fcr=True, group_size=10_000)
    batches = plan_first_batches(list(predictions), predictions, config)
    assert [(batch.bucket, len(batch.ids)) for batch in batches] == [(50, 256), (150, 64), (150, 6)]
    # the moved samples run under the larger bucket's cap, after the bucket's own members
    assert batches[1].ids[:60] == tuple(f"m{index}" for index in range(60))
    assert batches[1].ids[60:] == tuple(f"s{index}" for index in range(256, 260))
    assert batches[1].max_new_tokens == 150
    # the last bucket keeps its small remainder: there is nowhere to move it
    assert len(batches[-1].ids) == 6


def test_vbs_remainder_kept_when_large_enough():
    # bucket 200 (size 32): 32 + 20 -> 20 >= max(32 // 2, 16) stays
    predictions = {f"a{index}": 180 for index in range(52)}
    predictions["z"] = 400
    batches = plan_first_batches(list(predictions), predictions, ScheduleConfig(vbs=True, fcr=True))
    assert [(batch.bucket, len(batch.ids)) for batch in batches] == [(200, 32), (200, 20), (400, 1)]


def test_vbs_table_parsing():
    assert parse_vbs_table("50:256,100:128,150:64,200:32,250:16,300:16") == dict(PAPER_VBS_TABLE)
    with pytest.raises(ValueError):
        parse_vbs_table("60:8")
    with pytest.raises(ValueError):
        parse_vbs_table("50-8")


@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("seed", range(5))
def test_run_returns_every_id_in_input_order_with_its_own_length(config, seed):
    ids, predictions, actual = random_case(seed)
    record = run_schedule(ids, predictions, config, replay_executor(actual))
    assert list(record.results) == ids
    for sample_id, result in record.results.items():
        assert result.length == min(actual[sample_id], config.max_length)
        assert result.finished == (actual[sample_id] <= config.max_length)
    # FCR recomputes exactly the samples whose first cap was short of their length
    expected_failures = {
        sample_id
        for sample_id, result in record.results.items()
        if config.fcr and result.first_cap < config.max_length and actual[sample_id] > result.first_cap
    }
    assert {sample_id for sample_id, result in record.results.items() if result.recomputed} == expected_failures
    recomputed_in_batches = [
        sample_id for batch in record.batches if batch.batch.recompute for sample_id in batch.batch.ids
    ]
    assert sorted(recomputed_in_batches) == sorted(expected_failures)


def test_recompute_order_follows_first_batches():
    predictions = {"p": 5, "q": 1, "r": 5, "s": 1}
    actual = {"p": 9, "q": 4, "r": 2, "s": 1}
    config = ScheduleConfig(batch_size=2, fcr=True, max_length=16)
    record = run_schedule(list(predictions), predictions, config, replay_executor(actual))
    # first batches: (q, s) cap 1 -> q fails; (p, r) cap 5 -> p fails; recompute in that order
    assert [batch.batch.ids for batch in record.batches] == [("q", "s"), ("p", "r"), ("q", "p")]
    assert record.batches[-1].batch.recompute and record.batches[-1].batch.max_new_tokens == 16


def test_metrics_by_hand_vanilla():
    ids = list(SMALL_LENGTHS)
    config = ScheduleConfig(sort=False, batch_size=2, group_size=6, max_length=8)
    predictions = {sample_id: 8 for sample_id in ids}
    metrics = compute_metrics(run_schedule(ids, predictions, config, replay_executor(SMALL_LENGTHS)))
    # batches (a3, b10->8) 8 steps, (c1, d6) 6 steps, (e2, f8) 8 steps: slots 16 + 12 + 16
    assert metrics["token_slots"] == 44
    assert metrics["generated_tokens"] == 3 + 8 + 1 + 6 + 2 + 8
    assert metrics["average_length"] == pytest.approx(44 / 6)
    assert metrics["effective_token_ratio"] == pytest.approx(28 / 44)
    assert metrics["failure_ratio"] == 0
    assert metrics["truncated_ratio"] == pytest.approx(1 / 6)
    # a and b end after 8 steps, c and d after 14, e and f after 22; p90 by nearest rank is the 6th of 6
    assert metrics["decode_steps"] == 22
    assert metrics["mean_latency_steps"] == pytest.approx((8 + 8 + 14 + 14 + 22 + 22) / 6)
    assert metrics["p90_latency_steps"] == 22


def test_metrics_by_hand_fcr_counts_failed_attempts():
    ids = list(SMALL_LENGTHS)
    predictions = {"a": 2, "b": 8, "c": 1, "d": 6, "e": 2, "f": 8}
    config = ScheduleConfig(batch_size=2, group_size=6, max_length=8, fcr=True)
    record = run_schedule(ids, predictions, config, replay_executor(SMALL_LENGTHS))
    # sorted: (c1, a2) cap 2 -> a fails, 2 steps; (e2, d6) cap 6, 6 steps; (b8, f8) cap 8 = max_length,
    # b stops unfinished but is final; then a again at 8: 3 steps. Slots 4 + 12 + 16 + 3.
    metrics = compute_metrics(record)
    assert [batch.batch.ids for batch in record.batches] == [("c", "a"), ("e", "d"), ("b", "f"), ("a",)]
    assert metrics["token_slots"] == 35
    assert metrics["generated_tokens"] == 28
    assert metrics["failure_ratio"] == pytest.approx(1 / 6)
    assert record.results["a"].recomputed and record.results["a"].first_cap == 2
    assert not record.results["b"].recomputed and not record.results["b"].finished
    # a's latency is its recompute's end (2 + 6 + 8 + 3 steps), not its failed first attempt's
    assert metrics["mean_latency_steps"] == pytest.approx((19 + 16 + 2 + 8 + 8 + 16) / 6)


def test_groups_are_scheduled_independently():
    ids = [f"g{index}" for index in range(8)]
    predictions = {sample_id: 100 - index for index, sample_id in enumerate(ids)}
    config = ScheduleConfig(batch_size=2, group_size=4)
    record = run_schedule(ids, predictions, config, replay_executor(predictions))
    assert [batch.batch.ids for batch in record.batches] == [("g3", "g2"), ("g1", "g0"), ("g7", "g6"), ("g5", "g4")]
    assert [batch.batch.group for batch in record.batches] == [0, 0, 1, 1]


def test_executor_results_are_checked():
    config = ScheduleConfig(batch_size=2, max_length=4)

    def broken(batch):
        from src.scheduling.schedule import BatchOutcome

        return BatchOutcome({batch.ids[0]: 9}, {batch.ids[0]: True})

    with pytest.raises(RuntimeError):
        run_schedule(["a", "b"], {"a": 1, "b": 1}, config, broken)


def test_continuous_batching_by_hand():
    """Two slots: a freed slot takes the next request in the next iteration."""
    record = simulate_continuous(list(SMALL_LENGTHS), SMALL_LENGTHS, slots=2, max_length=9)
    # a 0-3, b 0-9 (capped), c 3-4, d 4-10, e 9-11, f 10-18
    assert record.finish_steps == {"a": 3, "b": 9, "c": 4, "d": 10, "e": 11, "f": 18}
    assert record.lengths["b"] == 9 and not record.finished["b"] and record.finished["a"]
    metrics = compute_continuous_metrics(record)
    assert metrics["decode_steps"] == 18
    assert metrics["token_slots"] == 36  # 18 iterations x 2 slots: the idle slot at the end is waste
    assert metrics["generated_tokens"] == 3 + 9 + 1 + 6 + 2 + 8
    assert metrics["effective_token_ratio"] == pytest.approx(29 / 36)
    assert metrics["mean_latency_steps"] == pytest.approx((3 + 9 + 4 + 10 + 11 + 18) / 6)
    assert metrics["p90_latency_steps"] == 18
    assert metrics["truncated_ratio"] == pytest.approx(1 / 6)


@pytest.mark.parametrize("seed", range(3))
def test_continuous_batching_beats_static_slots_and_one_slot_wastes_nothing(seed):
    ids, predictions, actual = random_case(seed)
    static = compute_metrics(run_schedule(ids, actual, ScheduleConfig(max_length=10_000), replay_executor(actual)))
    continuous = compute_continuous_metrics(simulate_continuous(ids, actual, slots=16, max_length=10_000))
    assert continuous["token_slots"] <= static["token_slots"]
    assert continuous["generated_tokens"] == static["generated_tokens"]
    serial = compute_continuous_metrics(simulate_continuous(ids, actual, slots=1, max_length=10_000))
    assert serial["effective_token_ratio"] == 1.0


def test_admission_order_sorts_within_groups_only():
    ids = ["a", "b", "c", "d", "e"]
    predictions = {"a": 5, "b": 1, "c": 3, "d": 9, "e": 2}
    assert admission_order(ids, None, 2) == ids
    assert admission_order(ids, predictions, 2) == ["b", "a", "c", "d", "e"]
    assert admission_order(ids, predictions, 10) == ["b", "e", "c", "a", "d"]


def test_a_batch_split_for_memory_is_charged_as_its_pieces_ran():
    from src.scheduling.batches import Batch
    from src.scheduling.schedule import ExecutedBatch

    lengths, batch = {"a": 2, "b": 8, "c": 3}, Batch(("a", "b", "c"), 8, 0)
    whole = ExecutedBatch(batch, lengths, dict.fromkeys(lengths, True))
    split = ExecutedBatch(batch, lengths, dict.fromkeys(lengths, True), parts=(("a",), ("b", "c")))
    assert (whole.steps, whole.token_slots) == (8, 24)  # 8 steps of 3 rows
    assert (split.steps, split.token_slots) == (2 + 8, 2 * 1 + 8 * 2)  # a alone for 2 steps, then b and c for 8


def test_continuous_arrivals_fcfs_shortest_first_and_aging_by_hand():
    from src.scheduling.continuous import simulate_continuous_arrivals
    from src.scheduling.metrics import compute_continuous_metrics

    lengths = {"a": 3, "b": 10, "c": 1, "d": 6, "e": 2, "f": 8}
    arrivals = {sample_id: float(index) for index, sample_id in enumerate(lengths)}  # one per step, in this order

    def run(priorities=None, aging=0.0):
        record = simulate_continuous_arrivals(arrivals, lengths, 1, 512, priorities, aging)
        return record.order, compute_continuous_metrics(record)

    # one slot, first come first served: a 0-3, b 3-13, c -14, d -20, e -22, f -30; latency = finish - arrival
    order, metrics = run()
    assert order == ["a", "b", "c", "d", "e", "f"]
    assert metrics["mean_latency_steps"] == pytest.approx((3 + 12 + 12 + 17 + 18 + 25) / 6)
    # shortest first: at 3 c (of b c d), at 4 e (b d e), at 6 d (b d f), at 12 f, b last at 20-30: starved, 29 steps
    order, metrics = run(lengths)
    assert order == ["a", "c", "e", "d", "f", "b"]
    assert metrics["mean_latency_steps"] == pytest.approx((3 + 2 + 2 + 9 + 15 + 29) / 6)
    assert metrics["max_latency_steps"] == 29
    # aging 1 token per step: at 12, b (10 - 11 waited = -1) overtakes f (8 - 7 = 1): b 12-22, f 22-30
    order, metrics = run(lengths, aging=1.0)
    assert order == ["a", "c", "e", "d", "b", "f"]
    assert metrics["mean_latency_steps"] == pytest.approx((3 + 2 + 2 + 9 + 21 + 25) / 6)
    assert metrics["max_latency_steps"] == 25
    assert metrics["decode_steps"] == 30 and metrics["token_slots"] == 30


def test_a_slot_idles_until_the_next_request_arrives():
    from src.scheduling.continuous import simulate_continuous_arrivals

    record = simulate_continuous_arrivals({"a": 0.0, "b": 10.0}, {"a": 2, "b": 3}, 2, 512)
    assert record.finish_steps == {"a": 2, "b": 13}


@pytest.mark.parametrize("resume", [False, True])
@pytest.mark.parametrize("retry_levels", [(), (1.2,), (1.1, 1.6)])
@pytest.mark.parametrize("seed", range(3))
def test_fcr_retries_give_every_id_its_whole_length(resume, retry_levels, seed):
    ids, predictions, actual = random_case(seed)
    config = ScheduleConfig(fcr=True, resume=resume)
    retry_caps = [{sample_id: int(predictions[sample_id] * level) for sample_id in ids} for level in retry_levels]
    record = run_schedule(ids, predictions, config, replay_executor(actual), retry_caps=retry_caps)
    for sample_id, result in record.results.items():
        assert result.length == min(actual[sample_id], config.max_length)
        assert result.finished == (actual[sample_id] <= config.max_length)
    # a resumed batch never starts a member past max_length, and every retry stays within the members' bounds
    for batch in record.batches:
        if batch.batch.resume_from:
            assert all(0 < done < config.max_length for done in batch.batch.resume_from)
            assert batch.batch.length_limit == config.max_length
    metrics = compute_metrics(record)
    assert (metrics["resumed_tokens"] > 0) == (resume and metrics["recomputed_samples"] > 0)


def test_resumed_failures_continue_by_hand():
    predictions = {"a": 2, "b": 2, "c": 4, "d": 4}
    actual = {"a": 2, "b": 9, "c": 3, "d": 30}
    config = ScheduleConfig(batch_size=2, max_length=20, fcr=True, resume=True)
    retry_caps = [{"a": 1, "b": 1, "c": 1, "d": 100}]  # d past max_length in its first retry: no second one
    record = run_schedule(list(predictions), predictions, config, replay_executor(actual), retry_caps=retry_caps)
    runs = [(batch.batch.ids, batch.batch.resume_from, batch.batch.max_new_tokens) for batch in record.batches]
    # first batches: (a, b) cap 2 -> b fails at 2; (c, d) cap 4 -> d fails at 4. First retry, sorted by tokens
    # still to make: d's q 100 -> min(100, 20) - 4 = 16 to make; b's q 1 is raised to 2 + 50, then to max_length
    # 20 -> 18 to make. One batch of both, cap 18: b ends (7 more), d runs 18 more, past max_length, and is cut.
    assert runs == [(("a", "b"), None, 2), (("c", "d"), None, 4), (("d", "b"), (4, 2), 18)]
    assert record.batches[-1].lengths == {"d": 18, "b": 7}
    assert record.results["b"].length == 9 and record.results["b"].finished and record.results["b"].recomputed
    assert record.results["d"].length == 20 and not record.results["d"].finished
    metrics = compute_metrics(record)
    assert metrics["token_slots"] == 2 * 2 + 4 * 2 + 18 * 2
    assert metrics["generated_tokens"] == 2 + 9 + 3 + 20
    assert metrics["resumed_tokens"] == 4 + 2


def test_a_retry_cap_reaches_a_bucket_past_where_the_sample_stopped():
    known_above, caps = {"x": 100, "y": 10}, {"x": 80, "y": 300}
    plain = plan_recompute(["y", "x"], ScheduleConfig(batch_size=4, fcr=True), 0, known_above, caps)
    # x's quantile 80 is below the 100 it is known to exceed: its cap becomes 150; sorted by tokens still to make
    assert [(batch.ids, batch.max_new_tokens, batch.resume_from) for batch in plain] == [(("x", "y"), 300, None)]
    resumed = plan_recompute(["y", "x"], ScheduleConfig(batch_size=1, fcr=True, resume=True), 0, known_above, caps, 2)
    assert [(batch.ids, batch.max_new_tokens, batch.resume_from) for batch in resumed] == [
        (("x",), 50, (100,)),
        (("y",), 290, (10,)),
    ]
    assert all(batch.recompute and batch.attempt == 2 for batch in resumed)
