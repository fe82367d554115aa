"""`python -m src.predict`: one JSON line per request with its rank, streamed in chunks, resumable after an
interruption without redoing finished chunks, refusing to resume under other settings."""

from __future__ import annotations

import json

import pytest

from src import predict
from src.common.cli import run_cli
from src.predictors.registry import PREDICTORS

from .conftest import cli_args


def read_lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_lines_in_file_order_with_ranks_shortest_first(small_data, tmp_path):
    data, lengths = small_data
    output = tmp_path / "predictions.jsonl"
    predict.main(cli_args(data_path=data, length_path=lengths, strategy="gt", max_length=8, output=output))
    lines = read_lines(output)
    # L_max: a3 b10 c1 d6 e2 f8, clamped to 8: b and f tie at 8 and keep file order (b first)
    assert [(line["id"], line["predicted_length"], line["rank"]) for line in lines] == [
        ("a", 3, 3),
        ("b", 8, 5),
        ("c", 1, 1),
        ("d", 6, 4),
        ("e", 2, 2),
        ("f", 8, 6),
    ]
    assert "quantiles" not in lines[0]  # the oracle has none
    assert not (tmp_path / "predictions.jsonl.partial").exists()


def test_an_interrupted_run_resumes_after_its_last_complete_line(small_data, tmp_path, monkeypatch):
    data, lengths = small_data
    output = tmp_path / "predictions.jsonl"
    argv = cli_args(data_path=data, length_path=lengths, strategy="gt", output=output, chunk_size=2)
    asked: list[list[str]] = []
    oracle = PREDICTORS["gt"]

    class InterruptedOracle(oracle):
        def predict_raw(self, samples):
            asked.append([sample.id for sample in samples])
            if len(asked) == 2:
                raise KeyboardInterrupt  # the user stops the run during its second chunk
            return super().predict_raw(samples)

    monkeypatch.setitem(PREDICTORS, "gt", InterruptedOracle)
    with pytest.raises(SystemExit) as stopped:
        run_cli(predict.main, argv)
    assert stopped.value.code == 130 and not output.exists()
    partial = tmp_path / "predictions.jsonl.partial"
    assert [row["id"] for row in read_lines(partial)] == ["a", "b"]  # the first chunk was kept
    with open(partial, "a") as handle:
        handle.write('{"id": "c", "predicted_len')  # a line cut short, as a kill during a write leaves it
    asked.clear()

    class CountingOracle(oracle):
        def predict_raw(self, samples):
            asked.append([sample.id for sample in samples])
            return super().predict_raw(samples)

    monkeypatch.setitem(PREDICTORS, "gt", CountingOracle)
    predict.main(argv)
    assert asked == [["c", "d"], ["e", "f"]]  # only what the partial file did not hold
    lines = read_lines(output)
    assert [line["id"] for line in lines] == ["a", "b", "c", "d", "e", "f"]
    assert [line["rank"] for line in lines] == [3, 6, 1, 4, 2, 5]
    assert not partial.exists() and not (tmp_path / "predictions.jsonl.partial.settings.json").exists()


def test_resuming_with_other_settings_is_refused(small_data, tmp_path, capsys):
    data, lengths = small_data
    output = tmp_path / "predictions.jsonl"
    partial = tmp_path / "predictions.jsonl.partial"
    argv = cli_args(data_path=data, length_path=lengths, strategy="constant", constant_length=5, output=output)
    (tmp_path / "predictions.jsonl.partial.settings.json").write_text(json.dumps({"strategy": "gt"}) + "\n")
    partial.write_text(json.dumps({"id": "a", "predicted_length": 3}) + "\n")
    with pytest.raises(SystemExit) as stopped:
        run_cli(predict.main, argv)
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert "predictions made with other settings" in error and "delete it" in error
    assert read_lines(partial) == [{"id": "a", "predicted_length": 3}]  # nothing lost
