"""Every marked table in README and docs/ is what its results file says, a cell edited by hand is found, and every
results file names its run (command, commit, date, machine)."""

from __future__ import annotations

import json
import subprocess

import pytest

from src import tables
from src.common.provenance import provenance

PROVENANCE = {
    "command": "python -m benchmarks.infer_speed real --num-data 4",
    "commit": "abc1234",
    "date": "2026-12-07 18:00 UTC",
    "machine": "AMD EPYC, 2 cores",
    "torch": "2.13.0+cpu",
    "transformers": "5.23.0",
}


def made_up_results() -> dict:
    vanilla = {"strategy": "vanilla", "requests": 4, "requests_per_s": 0.25, "speedup_over_vanilla": 1.0}
    vanilla |= {"mean_latency_s": 200.0, "latency_over_vanilla": 1.0, "texts_equal_to_vanilla": 4}
    vanilla |= {"token_slots": 1024, "effective_token_ratio": 0.5}
    default = {"strategy": "continuous:proxy", "requests": 4, "requests_per_s": 0.5, "speedup_over_vanilla": 2.0}
    default |= {"mean_latency_s": 80.0, "latency_over_vanilla": 0.4, "texts_equal_to_vanilla": 3}
    default |= {"token_slots": 600, "effective_token_ratio": 0.85333}
    runs = {"vanilla": vanilla, "default:predictors/proxy": default}
    return {"part": "real", "num_data": 4, "provenance": PROVENANCE, "runs": runs}


def test_a_table_is_built_from_its_results_file(tmp_path):
    (tmp_path / "infer-real-256.json").write_text(json.dumps(made_up_results()))
    assert tables.built_block("infer-real", tmp_path) == [
        "Run: `python -m benchmarks.infer_speed real --num-data 4` at commit abc1234, 2026-12-07 18:00 UTC, AMD EPYC, "
        "2 cores, torch 2.13.0+cpu, transformers 5.23.0.",
        "",
        "| run on the same 4 requests | requests/s | x vanilla | mean latency | texts equal to vanilla's |",
        "| --- | ---: | ---: | ---: | ---: |",
        "| plain batches, file order (`--strategy vanilla`) | 0.250 | 1.00x | 200.0 s (1.00x) | - |",
        "| **the default**: `continuous:proxy` | 0.500 | 2.00x | 80.0 s (0.40x) | 3 / 4 |",
    ]
    full = tables.built_block("infer-real-full", tmp_path)
    assert full[-1] == "| **the default**: `continuous:proxy` | 0.500 | 2.00x | 80.0 s | 0.40x | 600 | 85.3 % | 3 / 4 |"


def test_a_cell_edited_by_hand_is_found_and_rebuilt(tmp_path):
    (tmp_path / "infer-real-256.json").write_text(json.dumps(made_up_results()))
    block = tables.built_block("infer-real", tmp_path)
    text = "\n".join(["# Title", "", "<!-- table infer-real -->", *block, "", "After the table.", ""])
    assert tables.rebuilt(text, tmp_path) == (text, [])
    edited = text.replace("| 0.500 |", "| 0.600 |")
    assert edited != text
    assert tables.rebuilt(edited, tmp_path) == (text, ["infer-real"])
    shortened = text.replace("| 3 / 4 |\n", "|\n")  # a cut row
    assert tables.rebuilt(shortened, tmp_path) == (text, ["infer-real"])
    unknown = text.replace("table infer-real", "table infer-nothing")
    assert tables.rebuilt(unknown, tmp_path)[1] == ["infer-nothing (no such table in src.tables.TABLES)"]


def test_every_marked_table_in_the_docs_equals_its_results_file():
    used = set()
    for path in tables.documents():
        text = path.read_text()
        assert tables.rebuilt(text)[1] == [], f"{path}: run python -m src.tables --write"
        used |= {name for name, _, _ in tables.marked_blocks(text.split("\n"))}
    assert used == set(tables.TABLES)  # every table is published somewhere
    assert "<!-- table infer-real -->" in (tables.PROJECT / "README.md").read_text()


def test_every_results_file_names_its_run_and_the_folder_stays_small():
    files = sorted(tables.RESULTS.glob("*.json"))
    assert files
    for path in files:
        named = json.loads(path.read_text())["provenance"]
        assert all(named[key] for key in ("command", "commit", "date", "machine", "torch", "transformers")), path
        assert named["command"].startswith("python -m ") and "+changes" not in named["commit"], path
    assert sum(path.stat().st_size for path in tables.RESULTS.iterdir()) < 5 * 2**20


def test_provenance_names_this_checkout():
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=tables.PROJECT)
    named = provenance()
    assert named["commit"].removesuffix("+changes") == head.stdout.strip()
    assert named["machine"].endswith(" cores") and named["date"].endswith(" UTC")


def benchmark_run(command: str, dry: bool, rows: list[tuple[str, float | None, float, float]]) -> dict:
    """A src.benchmark --output-json as src.reproduce's parts write it: (strategy, samples/s, slots, ratio) rows."""
    results = [
        {"strategy": strategy, "dry_run": dry, "throughput_samples_per_s": rate, "average_length": slots}
        | {"effective_token_ratio": ratio, "samples": [{"id": "a", "length": 3}] * 4}
        for strategy, rate, slots, ratio in rows
    ]
    return {"args": {"device_name": None}, "results": results, "provenance": PROVENANCE | {"command": command}}


def test_the_side_by_side_table_names_both_runs_and_is_built_from_them(tmp_path, monkeypatch):
    dry = benchmark_run("python -m src.reproduce dry", True, [("vanilla", None, 362.69, 0.345)])
    cpu = benchmark_run(
        "python -m src.reproduce cpu", False, [("vanilla", 0.5, 334.69, 0.36), ("gt+vbs+fcr", 0.9, 187.3, 0.643)]
    )
    for name, run in (("dry.json", dry), ("cpu.json", cpu)):
        (tmp_path / name).write_text(json.dumps(run))
        tables.publish(str(tmp_path / name), f"reproduce-{name}", tmp_path)
    assert "samples" not in json.loads((tmp_path / "reproduce-cpu.json").read_text())["results"][0]
    both = tables.Table(("reproduce-dry.json", "reproduce-cpu.json"), tables.paper_side_by_side, ("dry run", "CPU"))
    monkeypatch.setitem(tables.TABLES, "paper", both)
    block = tables.built_block("paper", tmp_path)
    assert block[0].startswith("Run: dry run: `python -m src.reproduce dry` at commit abc1234")
    assert block[1].startswith("Run: CPU: `python -m src.reproduce cpu` at commit abc1234") and block[2] == ""
    assert block[3] == (
        "| strategy | the paper: A100, Vicuna-7B, 1024 samples | dry run: no model, 1024 samples | CPU: SmolLM2-135M, "
        "256 samples |"
    )
    assert (
        block[5]
        == "| vanilla (no scheduling) | 1.39 (1.00x), 370.84, 33.9 % | 362.69, 34.5 % | 0.50 (1.00x), 334.69, 36.0 % |"
    )
    # 0.9 / 0.5 = 1.80; the dry run has no such row
    assert (
        block[6]
        == "| oracle lengths + VBS + FCR | 2.69 (1.94x), 196.34, 61.6 % | not run | 0.90 (1.80x), 187.30, 64.3 % |"
    )
    text = "\n".join(["<!-- table paper -->", *block, ""])
    assert tables.rebuilt(text, tmp_path) == (text, [])
    assert tables.rebuilt(text.replace("0.90 (1.80x)", "0.95 (1.90x)"), tmp_path) == (text, ["paper"])
    with pytest.raises(SystemExit, match="without a folder"):
        tables.publish(str(tmp_path / "cpu.json"), "../elsewhere.json", tmp_path)
    with pytest.raises(SystemExit, match="is not replaced"):
        tables.publish(str(tmp_path / "cpu.json"), "reproduce-cpu.json", tmp_path)


def test_the_strategies_table_gives_each_run_its_seconds_and_slots_against_vanilla():
    columns = ("strategy", "throughput_samples_per_s", "average_length", "effective_token_ratio", "failure_ratio")
    columns += ("mean_latency_s", "p90_latency_s")
    rows = [("vanilla", 0.5, 300.0, 0.4, 0.0, 200.0, 380.0), ("gt", 0.9, 160.125, 0.75, 0.0625, 90.04, 210.0)]
    results = {"results": [dict(zip(columns, row, strict=True)) for row in rows]}
    assert tables.strategies_table(results)[2:] == [
        "| vanilla | 0.500 | 1.00x | 300.00 | 40.00 % | 0.00 % | 200.0 / 380.0 s |",
        "| gt | 0.900 | 1.80x | 160.12 | 75.00 % | 6.25 % | 90.0 / 210.0 s |",  # 0.9 / 0.5; 160.125 rounds to even
    ]


def test_a_run_without_per_sample_rows_is_published_as_it_is(tmp_path):
    """benchmarks.infer_speed's JSON has runs, not src.benchmark's results: it is copied whole."""
    run = tmp_path / "infer-real.json"
    run.write_text(json.dumps(made_up_results()))
    published = tables.publish(str(run), "infer-real-4.json", tmp_path)
    assert json.loads(published.read_text()) == made_up_results()
