"""The generation engine on a tiny random LLaMA, with replayed lengths."""

from __future__ import annotations

import pytest
import torch

from src.common.prompts import VICUNA_TEMPLATE, PromptFormatter
from src.engines.generate import generate_batch
from src.engines.registry import build_engine
from src.running.executor import StaticBatchExecutor
from src.scheduling.batches import ScheduleConfig
from src.scheduling.metrics import compute_metrics
from src.scheduling.schedule import replay_executor, run_schedule

from .conftest import SMALL_LENGTHS


def encode_all(tokenizer, ids):
    formatter = PromptFormatter(tokenizer, VICUNA_TEMPLATE)
    # prompts of different lengths, so left padding is exercised
    return {
        sample_id: formatter.encode(f"Question {sample_id}" + " and more" * index)
        for index, sample_id in enumerate(ids)
    }


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_replayed_lengths_are_exact_and_capped(tiny_model, temperature):
    model, tokenizer = tiny_model
    prompts = list(encode_all(tokenizer, SMALL_LENGTHS).values())
    targets = list(SMALL_LENGTHS.values())  # 3, 10, 1, 6, 2, 8
    generated = generate_batch(model, tokenizer, prompts, 8, temperature, replay_lengths=targets)
    assert [sample.length for sample in generated] == [min(target, 8) for target in targets]
    assert [sample.finished for sample in generated] == [target <= 8 for target in targets]
    for sample in generated:
        eos_positions = [i for i, token in enumerate(sample.token_ids) if token == tokenizer.eos_token_id]
        assert eos_positions == ([sample.length - 1] if sample.finished else [])


def test_batch_stops_when_all_finish(tiny_model):
    model, tokenizer = tiny_model
    prompts = list(encode_all(tokenizer, ["x", "y"]).values())
    calls = []
    original = model.forward

    def counting_forward(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    model.forward = counting_forward
    try:
        generated = generate_batch(model, tokenizer, prompts, 50, replay_lengths=[2, 4])
    finally:
        model.forward = original
    assert [sample.length for sample in generated] == [2, 4]
    assert len(calls) == 4  # one prefill + three decode steps: no step after the last EOS


def test_left_padding_does_not_change_greedy_output(tiny_model):
    model, tokenizer = tiny_model
    prompts = encode_all(tokenizer, ["short", "long"])
    alone = generate_batch(model, tokenizer, [prompts["short"]], 6, replay_lengths=[6])
    batched = generate_batch(model, tokenizer, [prompts["short"], prompts["long"]], 6, replay_lengths=[6, 6])
    assert alone[0].token_ids[:5] == batched[0].token_ids[:5]


@pytest.mark.parametrize(
    "config",
    [
        ScheduleConfig(sort=False, batch_size=2, group_size=6, max_length=8),
        ScheduleConfig(batch_size=2, group_size=6, max_length=8, fcr=True),
        ScheduleConfig(batch_size=4, group_size=3, max_length=9, vbs=True, fcr=True, vbs_default_batch_size=2),
    ],
    ids=["vanilla", "sorted-fcr", "vbs-fcr"],
)
def test_engine_metrics_equal_the_replay_executor(tiny_model, config):
    """The model-backed executor and the model-free one give the same batches, lengths and metrics."""
    model, tokenizer = tiny_model
    ids = list(SMALL_LENGTHS)
    predictions = {"a": 2, "b": 8, "c": 1, "d": 6, "e": 2, "f": 8}
    executor = StaticBatchExecutor(
        build_engine("transformers", model, tokenizer), encode_all(tokenizer, ids), 0.0, SMALL_LENGTHS
    )
    real = run_schedule(ids, predictions, config, executor)
    dry = run_schedule(ids, predictions, config, replay_executor(SMALL_LENGTHS))
    assert compute_metrics(real) == compute_metrics(dry)
    assert [batch.batch for batch in real.batches] == [batch.batch for batch in dry.batches]
    assert {k: (r.length, r.finished, r.recomputed) for k, r in real.results.items()} == {
        k: (r.length, r.finished, r.recomputed) for k, r in dry.results.items()
    }


def test_fcr_recomputes_exactly_the_failures_on_the_model(tiny_model):
    model, tokenizer = tiny_model
    ids = list(SMALL_LENGTHS)
    predictions = {"a": 2, "b": 8, "c": 1, "d": 6, "e": 2, "f": 8}
    seen = []
    executor = StaticBatchExecutor(
        build_engine("transformers", model, tokenizer), encode_all(tokenizer, ids), 0.0, SMALL_LENGTHS
    )

    def recording(batch):
        seen.append((batch.ids, batch.max_new_tokens, batch.recompute))
        return executor(batch)

    record = run_schedule(ids, predictions, ScheduleConfig(batch_size=2, max_length=12, fcr=True), recording)
    # a (3 > 2) and b (10 > 8) fail their caps; both run again at 12, a first as its batch ran first
    assert [entry for entry in seen if entry[2]] == [(("a", "b"), 12, True)]
    assert record.results["b"].length == 10 and record.results["b"].finished
    assert torch.is_inference_mode_enabled() is False
