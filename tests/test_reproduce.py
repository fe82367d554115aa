"""`python -m src.reproduce`: the README's tables from the clone alone."""

from __future__ import annotations

import pytest

from src import reproduce
from src.common.utils import UserError
from src.running.paper_table import side_by_side_table

from .conftest import cli_args


def paths(tmp_path) -> list[str]:
    return ["--runs-dir", str(tmp_path / "runs"), "--images-dir", str(tmp_path / "imgs")]


def test_dry_part_gives_the_paper_setting_from_the_shipped_data(tmp_path, capsys):
    """The issue's acceptance figures: vanilla 362.69 / 34.52 %, gt+vbs+fcr 195.23 / 64.13 % on 1024 samples."""
    outputs = reproduce.main(["dry", *paths(tmp_path), "--predictor-path", str(tmp_path / "no-proxy")])
    results = {result["strategy"]: result for result in outputs["dry"]["results"]}
    assert list(results) == ["vanilla", "gt", "gt+vbs+fcr", "continuous", "continuous:gt"]
    assert round(results["vanilla"]["average_length"], 2) == 362.69
    assert round(results["vanilla"]["effective_token_ratio"] * 100, 2) == 34.52
    assert round(results["gt+vbs+fcr"]["average_length"], 2) == 195.23
    assert round(results["gt+vbs+fcr"]["effective_token_ratio"] * 100, 2) == 64.13
    assert results["vanilla"]["num_samples"] == 1024
    assert {path.name for path in (tmp_path / "imgs").iterdir()} == {
        "dry-run-paper-strategies.png",
        "dry-run-paper-batches.png",
    }
    out = capsys.readouterr().out
    assert "no proxy predictor" in out
    assert "| vanilla | 362.69 | 34.52 % | 0.00 % |" in out  # the part's own table
    assert "| vanilla (no scheduling) | 1.39 (1.00x), 370.84, 33.9 % | 362.69, 34.5 % |" in out  # side by side


def test_a_run_of_fewer_strategies_leaves_the_shown_figures_alone(tmp_path, monkeypatch, capsys):
    """imgs/ keeps the figures of a part's every strategy: a run without the proxy's rows draws beside its JSON."""
    shown = tmp_path / "imgs"
    shown.mkdir()
    (shown / "dry-run-paper-strategies.png").write_bytes(b"the figure docs/ shows")
    monkeypatch.setattr(reproduce, "IMAGES", shown)
    reproduce.main(["dry", "--runs-dir", str(tmp_path / "runs"), "--predictor-path", str(tmp_path / "no-proxy")])
    assert (shown / "dry-run-paper-strategies.png").read_bytes() == b"the figure docs/ shows"
    assert (tmp_path / "runs" / "imgs" / "dry-run-paper-strategies.png").stat().st_size > 1000
    assert "its figures go to" in capsys.readouterr().out


def fake_result(strategy: str, throughput: float, average_length: float, effective: float) -> dict:
    return {
        "strategy": strategy,
        "throughput_samples_per_s": throughput,
        "average_length": average_length,
        "effective_token_ratio": effective,
        "dry_run": False,
    }


def test_side_by_side_cells_by_hand():
    outputs = {
        "gpu": {
            "args": {"device_name": "NVIDIA H200"},
            "results": [fake_result("vanilla", 1.5, 334.69, 0.3597), fake_result("gt+vbs+fcr", 2.4, 187.32, 0.6426)],
        }
    }
    lines = side_by_side_table(outputs)
    assert lines[0] == (
        "| strategy | the paper: A100, Vicuna-7B, 1024 samples | GPU: NVIDIA H200, Vicuna-7B shape, 256 samples |"
    )
    assert lines[2] == "| vanilla (no scheduling) | 1.39 (1.00x), 370.84, 33.9 % | 1.50 (1.00x), 334.69, 36.0 % |"
    # 2.4 / 1.5 = 1.60; the paper's 2.69 / 1.39 = 1.94
    assert lines[3] == "| oracle lengths + VBS + FCR | 2.69 (1.94x), 196.34, 61.6 % | 2.40 (1.60x), 187.32, 64.3 % |"
    assert lines[4].endswith("| 2.30 (1.65x), 215.06, 47.2 % | not run |")
    assert lines[5] == "| proxy + FCR, failures resumed (ours) | - | not run |"
    assert lines[6] == "| continuous batching, FCFS, 16 slots | - | not run |"


def test_a_model_part_runs_the_benchmark_and_draws(tiny_model_dir, small_data, tmp_path, monkeypatch, capsys):
    data, lengths = small_data
    arguments = cli_args(model=tiny_model_dir, device="cpu", data_path=data, replay_lengths=lengths, max_length=8)
    part = reproduce.Part("cpu", "tiny", (*arguments, "--batch-size", "2"), ("vanilla", "gt"))
    monkeypatch.setitem(reproduce.PARTS, "cpu", part)
    outputs = reproduce.main(["cpu", *paths(tmp_path)])
    vanilla, gt = outputs["cpu"]["results"]
    # data order (a3 b10 | c1 d6 | e2 f8, capped at 8) against sorted by L_max (c1 e2 | a3 d6 | f8 b8), batches of 2
    assert vanilla["token_slots"] == 2 * (8 + 6 + 8) and gt["token_slots"] == 2 * (2 + 6 + 8)
    assert outputs["cpu"]["args"]["device_name"].startswith("CPU")
    assert (tmp_path / "imgs" / "tiny-batches.png").is_file()
    out = capsys.readouterr().out
    assert "| strategy | samples/s | average length |" in out and "| CPU: SmolLM2-135M, 256 samples |" in out


def test_bad_parts(capsys, monkeypatch, tmp_path):
    with pytest.raises(UserError, match="unknown part 'tpu'"):
        reproduce.main(["tpu"])
    with pytest.raises(UserError, match="--quick shortens part cpu"):
        reproduce.main(["dry", "--quick"])
    assert reproduce.main(["--table-only", *paths(tmp_path)]) == {}
    assert "no results in" in capsys.readouterr().out
    monkeypatch.setattr(reproduce, "cuda_present", lambda: False)
    with pytest.raises(UserError, match="part gpu needs a CUDA GPU"):
        reproduce.main(["gpu"])
