"""`python -m src.plots` on a dry-run benchmark output."""

from __future__ import annotations

import pytest

from src import benchmark, plots
from src.common.cli import run_cli

from .conftest import write_json


def test_plots_from_a_dry_run(small_data, tmp_path):
    data, lengths = small_data
    output = tmp_path / "dry.json"
    benchmark.main(
        ["--data-path", str(data), "--dry-run", "--replay-lengths", str(lengths), "--max-length", "8"]
        + ["--batch-size", "2", "--strategies", "vanilla", "gt", "gt+fcr", "continuous", "--output-json", str(output)]
    )
    written = plots.main(["--input", str(output), "--output-dir", str(tmp_path / "imgs"), "--prefix", "t"])
    assert [path.name for path in written] == ["t-strategies.png", "t-batches.png"]
    for path in written:
        assert path.read_bytes().startswith(b"\x89PNG") and path.stat().st_size > 5000
    assert not [path for path in (tmp_path / "imgs").iterdir() if path.name.startswith(".")]  # no temporaries left


def test_plots_reject_a_file_without_results(tmp_path, capsys):
    bad = write_json(tmp_path / "bad.json", {"args": {}})
    with pytest.raises(SystemExit) as exit_info:
        run_cli(plots.main, ["--input", str(bad)])
    assert exit_info.value.code == 2
    assert "no benchmark results" in capsys.readouterr().err
