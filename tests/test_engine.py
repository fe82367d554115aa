"""The engine boundary: the benchmark, the generative predictors, lenpred and the VBS calibration reach the model
only through `src.engines.registry`, and a new engine is one class and one registry entry."""

from __future__ import annotations

import pytest

from src import benchmark
from src.common.utils import UserError
from src.engines import registry
from src.engines.base import EngineBase
from src.engines.eager import TransformersEngine

from .conftest import SMALL_LENGTHS, cli_args

CALLS: list[tuple[str, int]] = []


class RecordingEngine(EngineBase):
    """A second engine as a user would add one, holding the eager one (no engine derives from another): here it only
    records what it is asked to run."""

    name = "recording"
    keeps_kv_caches = True

    def __init__(self, model, tokenizer):
        super().__init__(model, tokenizer)
        self.eager = TransformersEngine(model, tokenizer)

    def generate(self, prompts, max_new_tokens, temperature=0.0, replay_lengths=None, **options):
        CALLS.append(("generate", len(prompts)))
        samples = self.eager.generate(prompts, max_new_tokens, temperature, replay_lengths, **options)
        self.last_timing = self.eager.last_timing
        return samples

    def run_queue(self, order, *args, **kwargs):
        CALLS.append(("run_queue", len(order)))
        return self.eager.run_queue(order, *args, **kwargs)

    def decode_step_seconds(self, batch_size, context):
        CALLS.append(("decode_step_seconds", batch_size))
        return 0.001 * batch_size  # a flat, made-up cost: the calibration's plumbing is what is tested


def test_every_model_call_of_the_benchmark_goes_through_the_chosen_engine(
    tiny_model_dir, small_data, tmp_path, monkeypatch
):
    monkeypatch.setitem(registry.ENGINE_CLASSES, "recording", "tests.test_engine:RecordingEngine")
    CALLS.clear()
    data, lengths = small_data
    flags = cli_args(
        model=tiny_model_dir, device="cpu", data_path=data, replay_lengths=lengths, max_length=8, batch_size=2
    )
    output = benchmark.main(
        [*flags, "--engine", "recording", "--vbs-table", "auto", "--strategies", "vanilla", "gt+vbs", "continuous"]
    )
    kinds = [kind for kind, _ in CALLS]
    assert CALLS[0] == ("generate", 1)  # the untimed warm-up batch
    calibrated = len(kinds) - kinds[::-1].index("decode_step_seconds")  # VBS auto times steps before any strategy
    assert set(kinds[1:calibrated]) == {"decode_step_seconds"}
    assert CALLS[calibrated : calibrated + 3] == [("generate", 2)] * 3  # vanilla: three batches of 2, in data order
    assert CALLS[-1] == ("run_queue", 6) and kinds.count("run_queue") == 1  # continuous batching: one queue of all
    vanilla = output["results"][0]
    assert {row["id"]: row["length"] for row in vanilla["samples"]} == {
        sample_id: min(length, 8) for sample_id, length in SMALL_LENGTHS.items()
    }
    assert output["args"]["engine"] == "recording"


def test_an_unknown_engine_is_a_user_error(tiny_model):
    model, tokenizer = tiny_model
    expected = "unknown --engine 'vllm': choose from auto, captured, compiled, graph, slots, transformers"
    with pytest.raises(UserError, match=expected):
        registry.build_engine("vllm", model, tokenizer)


def test_engines_are_composed_not_derived(tiny_model):
    """Every --engine name builds one of three classes, each over the contract's defaults only; the static-cache names
    differ by their decode step alone, and a step is a class of its own."""
    from src.engines.base import EngineBase
    from src.engines.static_cache import StaticCacheEngine

    model, tokenizer = tiny_model
    built = {name: registry.build_engine(name, model, tokenizer) for name in registry.engine_names()}
    assert {name: engine.name for name, engine in built.items()} == {name: name for name in built}
    for engine in built.values():
        assert type(engine).__mro__[1:] == (EngineBase, object)
    static = {name for name, engine in built.items() if isinstance(engine, StaticCacheEngine)}
    assert static == {"captured", "compiled", "graph"}
    steps = {name: type(built[name].step) for name in static}
    assert len(set(steps.values())) == 3 and all(step.__mro__[1:] == (object,) for step in steps.values())
    assert [built[name].decodes_itself for name in sorted(static)] == [True, False, True]


# A whole engine as a user would write one: a module with one class over the contract's defaults (no kept caches,
# no continuous batching), and nothing else.
PLAIN_ENGINE_MODULE = """
from src.engines.base import EngineBase
from src.engines.generate import eos_token_ids_of, generate_batch


class PlainEngine(EngineBase):
    name = "plain"

    def generate(self, prompts, max_new_tokens, temperature=0.0, replay_lengths=None, prefix_caches=None,
                 keep_caches=False, top_p=1.0):
        self.check_cache_arguments(prefix_caches, keep_caches)
        eos = eos_token_ids_of(self.model, self.tokenizer)
        return generate_batch(self.model, self.tokenizer, prompts, max_new_tokens, temperature, replay_lengths, eos,
                              top_p=top_p)
"""


def test_a_new_engine_is_one_module_and_one_registry_line(eos_model_dir, small_data, tmp_path, monkeypatch):
    """The module above and its line in ENGINES run every static strategy, +resume included (its failures prefilled
    again, since the engine keeps no caches), with the same answers as the eager engine; continuous batching, which
    it lacks, is refused as a user's mistake naming it."""
    (tmp_path / "plain_engine.py").write_text(PLAIN_ENGINE_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(registry.ENGINE_CLASSES, "plain", "plain_engine:PlainEngine")
    data, lengths = small_data
    flags = cli_args(model=eos_model_dir, device="cpu", data_path=data, length_path=lengths, max_length=24)
    strategies = ["--strategies", "vanilla", "gt+fcr", "gt+fcr+resume", "--gt-field", "L_t0.0", "--batch-size", "2"]
    answers = {}
    for engine in ("plain", "transformers"):
        folder = tmp_path / engine
        output = benchmark.main([*flags, *strategies, "--engine", engine, "--answers-dir", str(folder)])
        assert output["args"]["engine_resolved"] == engine
        resumed = output["results"][2]
        assert resumed["resumed_tokens"] > 0  # gt's lengths are not this model's: failures continue from their tokens
        reused = sum(batch["kv_reused_tokens"] for batch in resumed["batches"])
        assert (reused > 0) == (engine == "transformers")  # only the eager engine keeps caches
        answers[engine] = {path.name: path.read_text() for path in sorted(folder.iterdir())}
    assert list(answers["plain"]) == ["gt+fcr+resume.jsonl", "gt+fcr.jsonl", "vanilla.jsonl"]
    assert answers["plain"] == answers["transformers"]
    with pytest.raises(UserError, match="engine plain has no continuous batching"):
        benchmark.main([*flags, "--strategies", "continuous", "--engine", "plain"])
