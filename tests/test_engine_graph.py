"""The graph engine (its own decode loop, the whole step in one compiled function) and the captured engine (the same
loop, its eager step captured in a CUDA graph) generate what the eager engine generates, run exactly as many steps as
replayed lengths need and look for the end of free answers every few steps; the graph engine compiles its step once
for every shape, the captured engine compiles nothing, and its warm-up before a capture leaves the batch as it was."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

from src.common.models import load_model
from src.common.utils import set_seed
from src.engines.decode_loop import CHECK_EVERY, decode_one_token
from src.engines.decode_steps import CapturedStep, warm_up_decode_step
from src.engines.eager import TransformersEngine
from src.engines.registry import build_engine
from src.engines.static_cache import CACHE_LENGTH_STEP, StaticCacheEngine

PROMPTS = [[1, 5, 6, 7, 8], [1, 9, 10], [1, 11, 12, 13, 14, 15, 16], [1, 300, 400, 500], [1, 42]]


@pytest.fixture(scope="module", params=["graph", "captured"])
def engines(eos_model_dir, request):
    """The eager engine and one with its own decode loop (compiled, or captured: eager on a CPU) on one model whose
    greedy answers end, at lengths that vary from prompt to prompt."""
    model, tokenizer, _ = load_model(str(eos_model_dir), "cpu", "float32")
    return TransformersEngine(model, tokenizer), build_engine(request.param, model, tokenizer)


def answers(samples) -> list[tuple]:
    return [(sample.token_ids, sample.length, sample.finished, sample.text) for sample in samples]


def test_graph_generation_equals_eager_greedy_and_replayed(engines):
    eager, graph = engines
    assert graph.name in ("graph", "captured") and graph.keeps_kv_caches and graph.decodes_itself
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
    graph, eager = build_engine("graph", model, tokenizer), TransformersEngine(model, tokenizer)
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
    graph, eager = build_engine("graph", model, tokenizer), TransformersEngine(model, tokenizer)
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
    graph = build_engine("graph", model, tokenizer)
    assert not graph.decodes_itself
    expected = TransformersEngine(model, tokenizer).generate(PROMPTS[:2], 10, 0.0)
    assert answers(expected) != answers(plain)  # the penalty changes what greedy decoding writes
    assert answers(graph.generate(PROMPTS[:2], 10, 0.0)) == answers(expected)


def test_captured_engines_warm_up_leaves_the_batch_as_it_was(eos_model_dir):
    """Before it captures a shape's step on CUDA, the captured engine runs the step a few times mid-batch from the
    batch's own state. Run here on the CPU before every step of every batch, that warm-up leaves every answer the
    eager engine's (the state it restores is complete)."""

    class WarmedUpOnTheCpu:  # a step of its own: what a capture runs first, then the eager step standing for the replay
        decodes_in_loop = True
        generate_options = {"disable_compile": True}

        def compiling(self):
            return nullcontext()

        def run(self, model, slot, end_tokens):
            warm_up_decode_step(model, slot, end_tokens)
            decode_one_token(model, slot, end_tokens)

    model, tokenizer, _ = load_model(str(eos_model_dir), "cpu", "float32")
    eager = TransformersEngine(model, tokenizer)
    captured = StaticCacheEngine(model, tokenizer, "captured", WarmedUpOnTheCpu())
    assert not CapturedStep(model.device).on_cuda
    for rows in (3, 5):
        replayed = [9, 4, 11, 2, 6][:rows]
        expected = eager.generate(PROMPTS[:rows], 14, 0.0, replayed)
        assert answers(captured.generate(PROMPTS[:rows], 14, 0.0, replayed)) == answers(expected)
        assert answers(captured.generate(PROMPTS[:rows], 14, 0.0)) == answers(eager.generate(PROMPTS[:rows], 14, 0.0))


def test_a_warm_up_before_a_capture_changes_only_the_next_position(eos_model_dir):
    """A capture's warm-up runs the step mid-batch: afterwards every tensor of the slot is as it was, except the keys
    and values at the cache's next column and `generated`'s next column, both of which the batch's next step writes."""
    model, tokenizer, _ = load_model(str(eos_model_dir), "cpu", "float32")
    captured = build_engine("captured", model, tokenizer)
    # cut at 7 tokens before their replayed 20: 4 rows (a filler's included) of width 7 with 7 + 6 = 13 cached positions
    captured.generate(PROMPTS[:3], 7, 0.0, [20, 20, 20])
    (slot,) = [slot for shape, slot in captured.caches.items() if shape == (4, 128)]
    assert int(slot.step) == 7 and [int(layer.cumulative_length) for layer in slot.cache.layers] == [13, 13]
    named = {name: getattr(slot, name) for name in ("tokens", "positions", "attention_mask", "targets", "step")}
    named |= {"finished": slot.finished, "generated": slot.generated}
    for index, layer in enumerate(slot.cache.layers):
        named |= {
            f"keys {index}": layer.keys,
            f"values {index}": layer.values,
            f"length {index}": layer.cumulative_length,
        }
    before = {name: tensor.clone() for name, tensor in named.items()}
    warm_up_decode_step(model, slot, captured.end_tokens)
    changed = {name for name, tensor in named.items() if not torch.equal(tensor, before[name])}
    assert changed == {"generated", "keys 0", "values 0", "keys 1", "values 1"}
    assert torch.equal(slot.generated[:, :7], before["generated"][:, :7])  # the next token's column is 7
    assert torch.equal(slot.generated[:, 8:], before["generated"][:, 8:])
    for index in range(2):  # the cache's next column is 13
        for name in (f"keys {index}", f"values {index}"):
            assert torch.equal(named[name][:, :, :13], before[name][:, :, :13])
            assert torch.equal(named[name][:, :, 14:], before[name][:, :, 14:])


def test_decode_step_benchmark_keeps_each_engines_figures_as_it_goes(tiny_model_dir, tmp_path, monkeypatch):
    """benchmarks.decode_step times each engine once right after warming it, writing its JSON each time, so that an
    engine that fails (or compiles past a deadline) after another leaves that one's step measured."""
    import json

    from benchmarks import decode_step

    built = []

    def build_or_fail(name, model, tokenizer):
        built.append(name)
        if name == "graph":
            raise RuntimeError("stands for a run stopped while compiling")
        return build_engine(name, model, tokenizer)

    monkeypatch.setattr(decode_step, "build_engine", build_or_fail)
    output = tmp_path / "step.json"
    flags = ["--model", str(tiny_model_dir), "--device", "cpu", "--batch-size", "3", "--context", "5", "--steps", "4"]
    with pytest.raises(RuntimeError):
        decode_step.main([*flags, "--engines", "captured", "graph", "--output-json", str(output)])
    assert built == ["captured", "graph"]
    results = json.loads(output.read_text())["results"]
    assert list(results) == ["captured"] and results["captured"]["timed_calls"] == 1
    assert results["captured"]["clock_ms_per_step"] > 0

    summary = decode_step.main([*flags, "--engines", "transformers", "captured", "--repeats", "2"])
    assert {name: result["timed_calls"] for name, result in summary["results"].items()} == {
        "transformers": 2,
        "captured": 2,
    }


class StandInGraph:
    """What the captured engine's CUDA branch asks of torch.cuda, on the CPU: a graph records the step's arguments
    while `torch.cuda.graph` is open (the step is recorded, not run) and runs the step eagerly at each replay."""

    recording = None  # the graph being captured

    def __init__(self):
        self.arguments, self.replays = None, 0

    def replay(self):
        self.replays += 1
        decode_one_token(*self.arguments)


@pytest.fixture
def cuda_stand_ins(monkeypatch):
    """torch.cuda's streams and graphs replaced by stand-ins, and the captured module's step made to record itself
    into the graph being captured; returns the graphs made."""
    from contextlib import contextmanager

    from src.engines import decode_steps

    graphs = []

    class Stream:
        def wait_stream(self, other):
            pass

    def new_graph():
        graphs.append(StandInGraph())
        return graphs[-1]

    @contextmanager
    def capturing(graph, **options):
        StandInGraph.recording = graph
        yield
        StandInGraph.recording = None

    def step(*arguments):
        if StandInGraph.recording is None:
            decode_one_token(*arguments)
        else:
            StandInGraph.recording.arguments = arguments

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", new_graph)
    monkeypatch.setattr(torch.cuda, "graph", capturing)
    monkeypatch.setattr(decode_steps, "decode_one_token", step)
    return graphs


def test_captured_engine_captures_each_shape_once_and_replays_every_step(eos_model_dir, cuda_stand_ins, monkeypatch):
    """The CUDA branch with stand-ins for streams and graphs: one capture per shape at its first decode step (in the
    shape's filler warm-up), a replay for every later step, the answers the eager engine's; a replay that does not
    reproduce the eager warm-up's choice stops the run."""
    from torch._dynamo.utils import counters

    model, tokenizer, _ = load_model(str(eos_model_dir), "cpu", "float32")
    eager = TransformersEngine(model, tokenizer)
    torch._dynamo.reset()
    counters.clear()
    captured = build_engine("captured", model, tokenizer)
    captured.step.on_cuda = True
    replayed = [9, 4, 11]
    expected = eager.generate(PROMPTS[:3], 14, 0.0, replayed)
    assert answers(captured.generate(PROMPTS[:3], 14, 0.0, replayed)) == answers(expected)
    assert answers(captured.generate(PROMPTS[:3], 14, 0.0)) == answers(eager.generate(PROMPTS[:3], 14, 0.0))
    (slot,) = captured.caches.values()
    assert cuda_stand_ins == slot.graphs  # one graph, captured for the (4, 128) shape and kept in its slot
    # the filler warm-up's 3 steps (the first one captured, then replayed), 10 replayed steps, then the free batch's
    assert cuda_stand_ins[0].replays == 3 + 10 + captured.last_timing.decode_steps
    assert counters["stats"]["unique_graphs"] == 0

    class Faulty(StandInGraph):  # a capture that does not reproduce the step: every row chooses token 0
        def replay(self):
            super().replay()
            self.arguments[1].tokens.zero_()

    monkeypatch.setattr(torch.cuda, "CUDAGraph", Faulty)
    faulty = build_engine("captured", model, tokenizer)
    faulty.step.on_cuda = True
    with pytest.raises(RuntimeError, match="captured decode step chose other tokens"):
        faulty.generate(PROMPTS[:3], 14, 0.0, replayed)


def test_captured_sampling_goes_through_generate_uncompiled(eos_model_dir):
    """At temperature 1 the captured engine samples through generate, told not to compile (on CUDA it would):
    under one seed its answers are the eager engine's, with no compilation."""
    from torch._dynamo.utils import counters

    model, tokenizer, _ = load_model(str(eos_model_dir), "cpu", "float32")
    eager, captured = TransformersEngine(model, tokenizer), build_engine("captured", model, tokenizer)
    assert captured.step.generate_options == {"disable_compile": True}
    torch._dynamo.reset()
    counters.clear()
    set_seed(0)
    expected = eager.generate(PROMPTS[:2], 6, 1.0)
    set_seed(0)
    assert answers(captured.generate(PROMPTS[:2], 6, 1.0)) == answers(expected)
    assert counters["stats"]["unique_graphs"] == 0
