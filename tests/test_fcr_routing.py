"""FCR on a real model: every id gets back the answer to its own prompt, whatever batches and recomputes it went
through. Upstream recomputed failures with the wrong prompts (positions of the sorted order indexed the unsorted
prompts); replayed lengths cannot see that, because they are looked up by id, so this test compares what greedy
decoding wrote for each prompt."""

from __future__ import annotations

import pytest

from src.common.models import load_model_and_formatter
from src.engines.registry import build_engine
from src.running.executor import StaticBatchExecutor
from src.scheduling.batches import Batch, ScheduleConfig
from src.scheduling.schedule import run_schedule

PROMPTS = {
    "a": "Name a color.",
    "b": "Write a long story about a dragon who learns to bake bread in a small village.",
    "c": "What is 2 + 2?",
    "d": "List three rivers of Europe and say where each one begins and ends.",
    "e": "Say hello.",
    "f": "Explain why the sky is blue to a child, in a few sentences.",
}


def executor_and_answers(
    model_dir, max_length: int = 24, engine_name: str = "transformers"
) -> tuple[StaticBatchExecutor, dict]:
    """An engine's executor, and each prompt's greedy answer (length, text) when it runs alone to `max_length`
    tokens."""
    model, tokenizer, formatter, _ = load_model_and_formatter(str(model_dir), "cpu", "float32")
    engine = build_engine(engine_name, model, tokenizer)
    prompt_ids = {sample_id: formatter.encode(text) for sample_id, text in PROMPTS.items()}
    executor = StaticBatchExecutor(engine, prompt_ids, temperature=0.0, replay=None)
    alone = {sample_id: executor(Batch((sample_id,), max_length, group=0)) for sample_id in PROMPTS}
    return executor, {
        sample_id: (result.lengths[sample_id], result.texts[sample_id]) for sample_id, result in alone.items()
    }


def test_fcr_returns_each_id_the_answer_to_its_own_prompt(eos_model_dir):
    executor, answers = executor_and_answers(eos_model_dir)
    assert len({text for _, text in answers.values()}) > 1  # the prompts get different answers: routing is visible

    # predictions that sort the ids away from data order and cap every first batch below its answers' lengths,
    # so that every sample fails, is collected, and is recomputed in a batch of its own order
    predictions = {"a": 3, "b": 1, "c": 2, "d": 1, "e": 3, "f": 2}
    record = run_schedule(list(PROMPTS), predictions, ScheduleConfig(batch_size=2, max_length=24, fcr=True), executor)
    assert all(result.recomputed for result in record.results.values())
    assert {sample_id: (result.length, result.text) for sample_id, result in record.results.items()} == answers


@pytest.mark.parametrize("engine_name", ["transformers", "compiled", "graph", "captured"])
def test_resumed_failures_end_as_if_they_had_never_stopped(eos_model_dir, engine_name):
    """+resume: a failure continues from its own tokens (fed back after its own prompt) in a capped retry, and
    greedy decoding gives each id the same answer as one uninterrupted run, on every engine: the compiled and graph
    ones copy kept caches into their static caches."""
    executor, answers = executor_and_answers(eos_model_dir, engine_name=engine_name)

    predictions = {"a": 3, "b": 1, "c": 2, "d": 1, "e": 3, "f": 2}
    retry_caps = [{sample_id: 3 for sample_id in PROMPTS}]  # raised to where each stopped + 50, then to max_length
    config = ScheduleConfig(batch_size=2, max_length=24, fcr=True, resume=True)
    # with the failures' KV caches kept (the eager engine does), and with no room to keep them (prefilled again)
    for budget, reuses in ((None, True), (0, False)):
        executor.kept.budget_bytes = budget
        record = run_schedule(list(PROMPTS), predictions, config, executor, retry_caps=retry_caps)
        assert any(batch.batch.resume_from for batch in record.batches)
        assert any(batch.executor_fields["kv_reused_tokens"] for batch in record.batches) == reuses
        assert {sample_id: (result.length, result.text) for sample_id, result in record.results.items()} == answers
        assert not executor.kept.kv_caches and executor.kept.kv_cache_bytes == 0  # every kept cache was taken back


@pytest.mark.parametrize("engine_name", ["transformers", "compiled", "graph", "captured"])
def test_resumed_failures_chain_kept_caches_through_capped_retries(tiny_model_dir, engine_name):
    """Retries capped twice below max_length: a batch fed kept caches keeps its unfinished rows' caches again, and a
    last retry of members at different points cuts whoever passes max_length, as the scheduler counts it. (The tiny
    model without the EOS boost rarely ends an answer, so every sample goes through every retry.)"""
    executor, answers = executor_and_answers(tiny_model_dir, max_length=120, engine_name=engine_name)
    predictions = {"a": 3, "b": 1, "c": 2, "d": 1, "e": 3, "f": 2}
    retry_caps = [{sample_id: 3 for sample_id in PROMPTS}] * 2  # each raised to 50 past where the sample stopped
    config = ScheduleConfig(batch_size=2, max_length=120, fcr=True, resume=True)
    record = run_schedule(list(PROMPTS), predictions, config, executor, retry_caps=retry_caps)
    assert {sample_id: (result.length, result.text) for sample_id, result in record.results.items()} == answers
    reused = [batch.executor_fields["kv_reused_tokens"] for batch in record.batches]
    attempts = [batch.batch.attempt for batch in record.batches]
    assert any(count for count, attempt in zip(reused, attempts, strict=True) if attempt == 2)
    assert not executor.kept.kv_caches

    # members at different points: first caps 2 and 4; b's retry cap 100 sorts the retries into (a, c) and (d, b),
    # which stop at 52, 54, 102 and 100; the last retry (d, b) runs 20 more, so d passes 120 and its text is cut
    # there (the answers alone are 120 tokens)
    ids = ["a", "b", "c", "d"]
    predictions = {"a": 1, "b": 2, "c": 3, "d": 4}
    retry_caps = [{"a": 3, "b": 100, "c": 3, "d": 3}]
    record = run_schedule(ids, predictions, config, executor, retry_caps=retry_caps)
    assert [(batch.batch.ids, batch.batch.resume_from) for batch in record.batches if batch.batch.attempt == 2] == [
        (("d", "b"), (102, 100)),
        (("c", "a"), (54, 52)),
    ]
    assert {sample_id: (result.length, result.text) for sample_id, result in record.results.items()} == {
        sample_id: answers[sample_id] for sample_id in ids
    }
