"""The engine boundary: the benchmark, the generative predictors, lenpred and the VBS calibration reach the model
only through `src.engines.registry`, and a new engine is one class and one registry entry."""

from __future__ import annotations

import pytest

from src import benchmark
from src.common.utils import UserError
from src.engines import registry
from src.engines.eager import TransformersEngine

from .conftest import SMALL_LENGTHS, cli_args

CALLS: list[tuple[str, int]] = []


class RecordingEngine(TransformersEngine):
    """A second engine as a user would add one: here it only records what it is asked to run."""

    name = "recording"

    def generate(self, prompts, max_new_tokens, temperature=0.0, replay_lengths=None):
        CALLS.append(("generate", len(prompts)))
        return super().generate(prompts, max_new_tokens, temperature, replay_lengths)

    def run_queue(self, order, *args, **kwargs):
        CALLS.append(("run_queue", len(order)))
        return super().run_queue(order, *args, **kwargs)

    def decode_step_seconds(self, batch_size, context):
        CALLS.append(("decode_step_seconds", batch_size))
        return 0.001 * batch_size  # a flat, made-up cost: the calibration's plumbing is what is tested


def test_every_model_call_of_the_benchmark_goes_through_the_chosen_engine(
    tiny_model_dir, small_data, tmp_path, monkeypatch
):
    monkeypatch.setitem(registry.ENGINES, "recording", "tests.test_engine:RecordingEngine")
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
    with pytest.raises(UserError, match="unknown --engine 'vllm': choose from auto, compiled, transformers"):
        registry.build_engine("vllm", model, tokenizer)
