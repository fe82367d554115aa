"""The slots engine's continuous batching (a finished answer's row of one static cache goes to the next request) gives
every request the answer the eager engine gives it in a static batch: greedy answers that end by EOS, replayed
lengths, answers that outlive many refills, window moves and row shrinks, and prompts that share a prefix."""

from __future__ import annotations

import pytest

from src.common.models import load_model
from src.engines import slots
from src.engines.eager import TransformersEngine
from src.engines.registry import build_engine
from src.engines.slot_cache import SlotCache
from src.engines.slots import shared_prefix

PROMPTS = {
    "a": [1, 5, 6, 7, 8],
    "b": [1, 9, 10],
    "c": [1, 11, 12, 13, 14, 15, 16],
    "d": [1, 300, 400, 500],
    "e": [1, 42],
    "f": [1, 77, 78, 79, 80, 81, 82, 83, 84, 85],
    "g": [1, 600, 601],
}


def eager_answers(engine, prompt_ids, max_length, replay=None) -> dict[str, tuple]:
    """Each request alone in a static batch of the eager engine: (tokens' text, length, finished)."""
    answers = {}
    for request_id, prompt in prompt_ids.items():
        lengths = [replay[request_id]] if replay else None
        (sample,) = engine.generate([prompt], max_length, 0.0, lengths)
        answers[request_id] = (sample.text, sample.length, sample.finished)
    return answers


def queue_answers(outcome) -> dict[str, tuple]:
    return {key: (outcome.texts[key], outcome.lengths[key], outcome.finished[key]) for key in outcome.lengths}


@pytest.fixture(scope="module")
def eos_engines(eos_model_dir):
    model, tokenizer, _ = load_model(str(eos_model_dir), "cpu", "float32")
    return TransformersEngine(model, tokenizer), build_engine("slots", model, tokenizer)


@pytest.fixture(scope="module")
def endless_engines(tiny_model):
    """The tiny model never emits EOS by itself: lengths are replayed."""
    model, tokenizer = tiny_model
    return TransformersEngine(model, tokenizer), build_engine("slots", model, tokenizer)


def test_greedy_answers_that_end_equal_the_eager_engine(eos_engines):
    eager, engine = eos_engines
    expected = eager_answers(eager, PROMPTS, 30)
    # on these raw prompts (no template) some answers end by EOS, at different lengths, and some reach the cap: rows
    # free up at different steps
    assert len({length for _, length, finished in expected.values()}) > 1
    assert any(finished for _, _, finished in expected.values())
    for rows in (1, 2, 3, 16):
        told = []
        outcome = engine.run_queue(list(PROMPTS), PROMPTS, 30, rows, on_result=told.append)
        assert queue_answers(outcome) == expected
        # each answer told once, as it ended, with the running count
        assert sorted(result.id for result in told) == sorted(PROMPTS)
        assert [result.done for result in told] == list(range(1, len(PROMPTS) + 1))
        assert [result.seconds for result in told] == sorted(result.seconds for result in told)


def test_replayed_lengths_refill_rows_and_equal_the_eager_engine(endless_engines):
    eager, engine = endless_engines
    replay = {"a": 3, "b": 11, "c": 1, "d": 6, "e": 2, "f": 9, "g": 14}
    expected = eager_answers(eager, PROMPTS, 12, replay)
    # 14 is over the cap of 12: that answer stops there, unfinished
    assert expected["g"][1:] == (12, False) and expected["c"][1:] == (1, True) and expected["b"][1:] == (11, True)
    order = ["c", "e", "a", "d", "f", "b", "g"]
    for rows in (2, 3):
        assert queue_answers(engine.run_queue(order, PROMPTS, 12, rows, replay=replay)) == expected


def test_window_moves_and_row_shrinks_keep_every_answer(endless_engines, monkeypatch):
    """With a window that moves after 2 dead columns, an answer that outlives five others, and a queue that runs dry
    while rows are busy, the live columns move left and right and the cache shrinks to fewer rows; every answer
    stays the eager engine's."""
    eager, engine = endless_engines
    replay = {"a": 40, "b": 3, "c": 5, "d": 2, "e": 7, "f": 4, "g": 30}
    expected = eager_answers(eager, PROMPTS, 48, replay)
    moves, shrinks = [], []
    move_columns, keep_rows = SlotCache.move_columns, SlotCache.keep_rows

    def counted_move(cache, first, new_end):
        moves.append((first, cache.column.index, new_end))
        move_columns(cache, first, new_end)

    def counted_shrink(cache, rows):
        shrinks.append((cache.rows, len(rows)))
        keep_rows(cache, rows)

    monkeypatch.setattr(slots, "DEAD_COLUMNS_BEFORE_MOVE", 2)
    monkeypatch.setattr(SlotCache, "move_columns", counted_move)
    monkeypatch.setattr(SlotCache, "keep_rows", counted_shrink)
    outcome = engine.run_queue(list(PROMPTS), PROMPTS, 48, 4, replay=replay)
    assert queue_answers(outcome) == expected
    assert any(new_end < end for _, end, new_end in moves)  # live columns moved left
    assert any(new_end > end for _, end, new_end in moves)  # and right, to make room for a longer prompt
    assert shrinks and shrinks[0] == (4, 2)  # the queue ran dry with 2 of 4 rows busy


def test_a_shared_prefix_is_prefilled_once_and_changes_no_answer(eos_engines, monkeypatch):
    eager, engine = eos_engines
    header = [1, 901, 902, 903, 904]
    prompt_ids = {key: header + prompt[1:] for key, prompt in PROMPTS.items()}
    expected = eager_answers(eager, prompt_ids, 30)
    prefixes = []
    prefill_prefix = slots.prefill_prefix

    def recorded(model, prefix):
        prefixes.append(list(prefix))
        return prefill_prefix(model, prefix)

    monkeypatch.setattr(slots, "SHARED_PREFIX_MIN_TOKENS", 3)
    monkeypatch.setattr(slots, "prefill_prefix", recorded)
    assert queue_answers(engine.run_queue(list(prompt_ids), prompt_ids, 30, 3)) == expected
    assert prefixes == [header]


def test_shared_prefix_leaves_every_prompt_its_last_token(monkeypatch):
    monkeypatch.setattr(slots, "SHARED_PREFIX_MIN_TOKENS", 2)
    assert shared_prefix([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 3, 4, 6]]) == [1, 2, 3]
    assert shared_prefix([[1, 2, 3], [1, 2, 3, 4]]) == [1, 2]  # the shorter prompt's last token is computed
    assert shared_prefix([[1, 2, 3], [1, 7, 3]]) == []  # one shared token is below the minimum
    assert shared_prefix([[5, 6, 7]]) == [5, 6]
