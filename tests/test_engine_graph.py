"""The graph engine (its own decode loop, the whole step in one compiled function) generates what the eager engine
generates, runs exactly as many steps as replayed lengths need, looks for the end of free answers every few steps,
and compiles its step once for every shape."""

from __future__ import annotations

import pytest
import torch

from src.common.models import load_model
from src.common.utils import set_seed
from src.engines.compiled import CACHE_LENGTH_STEP
from src.engines.eager import TransformersEngine
from src.engines.graph import CHECK_EVERY, GraphEngine
from src.engines.registry import build_engine

PROMPTS = [[1, 5, 6, 7, 8], [1, 9, 10], [1, 11, 12, 13, 14, 15, 16], [1, 300, 400, 500], [1, 42]]


@pytest.fixture(scope="module")
def engines(eos_model_dir):
    """Both engines on one model whose greedy answers end, at lengths that vary from prompt to prompt."""
    model, tokenizer, _ = load_model(str(eos_model_dir), "cpu", "float32")
    return TransformersEngine(model, tokenizer), build_engine("graph", model, tokenizer)


def answers(samples) -> list[tuple]:
    return [(sample.token_ids, sample.length, sample.finished, sample.text) for sample in samples]


def test_graph_generation_equals_eager_greedy_and_replayed(engines):
    eager, graph = engines
    assert graph.name == "graph" and graph.keeps_kv_caches and graph.decodes_itself
    for rows in (3, 5, 1):  # with filler rows: 4, 8 and 2
        replayed = [3, 7, 5, 2, 6][:rows]
        expected = eager.generate(PROMPTS[:rows], 12, 0.0, replayed)
        assert answers(graph.generate(PROMPTS[:rows], 12, 0.0, replayed)) == answers(expected)
        # every length replayed: the step count is known, and no step runs past the longest row
        assert graph.last_timing.decode_steps == max(replayed) - 1

        expected = eager.generate(PROMPTS[:rows], 12, 0.0)
        got = graph.generate(PROMPTS[:rows], 12, 0.0)
        assert answers(got) == answers(expected)
        if rows > 1:  # free answers of this model end at different lengths, some never
            assert len({sample.length for sample in got}) > 1
    assert graph.warmed_shapes == [(4, 128), (8, 128), (2, 128)]


def test_free_answers_stop_within_a_look_of_their_end(engines):
    """Rows that end by EOS (4 and 9 tokens here) stop the batch at the first look after the last one ended, far
    before the cap; the extra steps emit padding only, so the answers are the eager engine's."""
    eager, graph = engines
    prompts = [[1, 5, 6, 7, 8], [1, 9, 10]]
    expected = eager.generate(prompts, 60, 0.0)
    assert all(sample.finished for sample in expected)
    assert answers(graph.generate(prompts, 60, 0.0)) == answers(expected)
    longest = max(sample.length for sample in expected)
    # the look after `steps` steps sees every row finished: the first multiple of CHECK_EVERY at or past longest - 1
    assert graph.last_timing.decode_steps == -(-(longest - 1) // CHECK_EVERY) * CHECK_EVERY < 59


def test_one_compiled_step_serves_every_batch_size_and_cache_length(tiny_model):
    """Rows 2 to 16 and caches of 128 and 256 tokens run through the step compiled at the first batch (one graph in
    all), with the eager engine's tokens, an answer of 140 tokens included."""
    from torch._dynamo.utils import counters

    model, tokenizer = tiny_model
    torch._dynamo.reset()  # forget what other tests compiled, so that this engine's first batch compiles afresh
    counters.clear()
    graph, eager = GraphEngine(model, tokenizer), TransformersEngine(model, tokenizer)
    graphs = []
    for rows, new_tokens in ((1, 4), (3, 4), (8, 4), (16, 4), (2, CACHE_LENGTH_STEP + 12)):
        prompts = [[tokenizer.bos_token_id, 100 + row, 200] for row in range(rows)]
        lengths = [new_tokens] * rows
        assert answers(graph.generate(prompts, new_tokens, 0.0, lengths)) == answers(
            eager.generate(prompts, new_tokens, 0.0, lengths)
        )
        graphs.append(counters["stats"]["unique_graphs"])
    assert graph.warmed_shapes == [(2, 128), (4, 128), (8, 128), (16, 128), (2, 256)]
    assert graphs == [1, 1, 1, 1, 1]


def test_graph_sampling_is_the_eager_engines_under_one_seed(tiny_model):
    """At temperature 1 the graph engine samples through generate's compiled step: under one seed its answers are
    the eager engine's, and they are not its greedy ones."""
    model, tokenizer = tiny_model
    graph, eager = GraphEngine(model, tokenizer), TransformersEngine(model, tokenizer)
    prompts = [[1, 5, 6, 7, 8], [1, 9, 10]]
    greedy = graph.generate(prompts, 6, 0.0)
    set_seed(0)
    expected = eager.generate(prompts, 6, 1.0)
    set_seed(0)
    got = graph.generate(prompts, 6, 1.0)
    assert answers(got) == answers(expected)
    assert [sample.token_ids for sample in got] != [sample.token_ids for sample in greedy]


def test_a_model_with_its_own_logits_processors_decodes_through_generate(eos_model_dir):
    """A generation config that adds a processor (here a repetition penalty, which changes the greedy answers) is
    honoured: the graph engine hands such a model to generate, and its answers stay the eager engine's."""
    model, tokenizer, _ = load_model(str(eos_model_dir), "cpu", "float32")
    plain = TransformersEngine(model, tokenizer).generate(PROMPTS[:2], 10, 0.0)
    model.generation_config.repetition_penalty = 3.0
    graph = GraphEngine(model, tokenizer)
    assert not graph.decodes_itself
    expected = TransformersEngine(model, tokenizer).generate(PROMPTS[:2], 10, 0.0)
    assert answers(expected) != answers(plain)  # the penalty changes what greedy decoding writes
    assert answers(graph.generate(PROMPTS[:2], 10, 0.0)) == answers(expected)
