"""README's and docs' tables of measured runs, built from the results files that ship in results/.

    python -m src.tables            # rebuild every marked table and compare: exit 1 naming each one that differs
    python -m src.tables --write    # rewrite every marked table from its results file
    python -m src.tables --publish runs/cpu.json reproduce-cpu.json   # a run's JSON into results/, made small

A published run writes its JSON (its `--output-json`, with the `provenance` of `src.common.provenance.provenance`: the
command, commit, date and machine) and the JSON is copied into results/. A table in a markdown file is marked by a line
`<!-- table NAME -->`; the block under it (a line naming the run, a blank line, the table) is exactly what
`TABLES[NAME]` builds from its results file. So a figure in a marked table is the
results file's, and a cell edited by hand is found by `tests/test_tables.py`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .common.utils import write_text_atomic

PROJECT = Path(__file__).resolve().parent.parent
RESULTS = PROJECT / "results"
# the markdown files whose marked tables are checked, relative to the project
DOCUMENTS = ("README.md", "docs")
MARKER = re.compile(r"^<!-- table ([a-z0-9-]+) -->$")


RUN_LINE_START = "Run: "


def run_line(provenance: dict, label: str = "") -> str:
    """The sentence that names a table's run (`label`: which part of the table it made, when several runs did)."""
    return (
        f"{RUN_LINE_START}{label + ': ' if label else ''}`{provenance['command']}` at commit {provenance['commit']}, "
        f"{provenance['date']}, {provenance['machine']}, torch {provenance['torch']}, transformers "
        f"{provenance['transformers']}."
    )


def times(value: float) -> str:
    return f"{value:.2f}x"


def texts_equal(run: dict) -> str:
    """How many of a run's answers read as vanilla's ("-" for vanilla itself)."""
    return "-" if run["strategy"] == "vanilla" else f"{run['texts_equal_to_vanilla']} / {run['requests']}"


def infer_real_rows(results: dict) -> list[tuple[str, dict]]:
    """benchmarks.infer_speed real's runs, each with the words a table gives it, in the script's order."""
    names = {
        "vanilla": "plain batches, file order (`--strategy vanilla`)",
        "continuous (manager)": "transformers' continuous batching (its manager, FCFS)",
        "proxy+fcr+resume": "`proxy+fcr+resume` (static batches, cut and resumed)",
    }
    rows = []
    for name, run in results["runs"].items():
        if name.startswith("default:"):
            words = f"**the default**: `{run['strategy']}`"
        else:
            words = names[name]
        rows.append((words, run))
    return rows


def infer_real_table(results: dict) -> list[str]:
    """README's short table: requests/s, mean latency and texts against vanilla's."""
    lines = [
        f"| run on the same {results['num_data']} requests | requests/s | x vanilla | mean latency | texts equal to "
        "vanilla's |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for words, run in infer_real_rows(results):
        lines.append(
            f"| {words} | {run['requests_per_s']:.3f} | {times(run['speedup_over_vanilla'])} | "
            f"{run['mean_latency_s']:.1f} s ({times(run['latency_over_vanilla'])}) | {texts_equal(run)} |"
        )
    return lines


def infer_real_full_table(results: dict) -> list[str]:
    """docs/INFER.md's table: the short one's columns, with token slots, against vanilla's and each other's."""
    lines = [
        "| run | requests/s | x vanilla | mean latency | x vanilla | token slots | effective token ratio | texts equal "
        "to vanilla's |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for words, run in infer_real_rows(results):
        lines.append(
            f"| {words} | {run['requests_per_s']:.3f} | {times(run['speedup_over_vanilla'])} | "
            f"{run['mean_latency_s']:.1f} s | {times(run['latency_over_vanilla'])} | {run['token_slots']:,} | "
            f"{run['effective_token_ratio'] * 100:.1f} % | {texts_equal(run)} |"
        )
    return lines


def strategies_table(results: dict) -> list[str]:
    """docs/CPU.md's table of a benchmark run (src.reproduce cpu): each strategy's seconds and token slots, in the
    order the run ran them; x vanilla is samples/s against vanilla's of the same run."""
    lines = [
        "| strategy | samples/s | x vanilla | token slots per sample | effective token ratio | failure ratio | "
        "mean / p90 latency |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    rows = results["results"]
    vanilla = next(row["throughput_samples_per_s"] for row in rows if row["strategy"] == "vanilla")
    for row in rows:
        lines.append(
            f"| {row['strategy']} | {row['throughput_samples_per_s']:.3f} | "
            f"{times(row['throughput_samples_per_s'] / vanilla)} | {row['average_length']:.2f} | "
            f"{row['effective_token_ratio'] * 100:.2f} % | {row['failure_ratio'] * 100:.2f} % | "
            f"{row['mean_latency_s']:.1f} / {row['p90_latency_s']:.1f} s |"
        )
    return lines


def paper_side_by_side(dry: dict, cpu: dict | None = None) -> list[str]:
    """README's side-by-side table: the paper against src.reproduce's dry part and, once published, its CPU part."""
    from .running.paper_table import side_by_side_table

    return side_by_side_table({"dry": dry} | ({"cpu": cpu} if cpu is not None else {}))


@dataclass(frozen=True)
class Table:
    results: tuple[str, ...]  # its files under results/
    build: Callable[..., list[str]]  # the table's lines from those files' JSON, in that order
    labels: tuple[str, ...] = ("",)  # what each run's line says it made


TABLES = {
    "infer-real": Table(("infer-real-256.json",), infer_real_table),
    "infer-real-full": Table(("infer-real-256.json",), infer_real_full_table),
    "paper": Table(("reproduce-dry.json", "reproduce-cpu.json"), paper_side_by_side, ("dry run", "CPU")),
    "cpu": Table(("reproduce-cpu.json",), strategies_table),
    "quickstart": Table(("quickstart.json",), strategies_table),
}


def built_block(name: str, results_dir: Path = RESULTS) -> list[str]:
    """What the marker of table `name` must be followed by: a line per run, a blank line, the table."""
    table = TABLES[name]
    loaded = [json.loads((results_dir / file).read_text()) for file in table.results]
    runs = [run_line(results["provenance"], label) for results, label in zip(loaded, table.labels, strict=True)]
    return [*runs, "", *table.build(*loaded)]


def publish(run: str, name: str, results_dir: Path = RESULTS) -> Path:
    """A benchmark's --output-json copied into results/ as `name`, without its per-sample rows (each strategy keeps
    its figures and its batches), so that the folder stays small; an existing file is never replaced."""
    results = json.loads(Path(run).read_text())
    if "provenance" not in results:
        raise SystemExit(f"{run} records no provenance (command, commit, date, machine): it cannot be published")
    if "results" in results:  # a src.benchmark run (benchmarks.infer_speed's keeps no per-sample rows)
        results["results"] = [
            {key: value for key, value in row.items() if key != "samples"} for row in results["results"]
        ]
    if Path(name).name != name or not name.endswith(".json"):
        raise SystemExit(f"{name}: give a file name ending in .json, without a folder: it goes into {results_dir}")
    target = results_dir / name
    if target.exists():
        raise SystemExit(f"{target} exists: a published result is not replaced; remove it first to publish anew")
    write_text_atomic(target, json.dumps(results, indent=1) + "\n")
    return target


def marked_blocks(lines: list[str]) -> list[tuple[str, int, int]]:
    """Each marked table of a markdown file's lines: (name, first line after the marker, end). The block is the run's
    line (it starts with "Run: "), the blank line after it and the table's lines after that; a marker followed by
    anything else has an empty block, where --write inserts one."""
    blocks = []
    for index, line in enumerate(lines):
        match = MARKER.match(line)
        if not match:
            continue
        start = end = index + 1
        if end < len(lines) and lines[end].startswith(RUN_LINE_START):
            while end < len(lines) and lines[end].startswith(RUN_LINE_START):
                end += 1
            end += 1  # the blank line
            while end < len(lines) and lines[end].startswith("|"):
                end += 1
        blocks.append((match.group(1), start, min(end, len(lines))))
    return blocks


def documents(project: Path = PROJECT) -> list[Path]:
    paths = []
    for entry in DOCUMENTS:
        path = project / entry
        paths += sorted(path.glob("*.md")) if path.is_dir() else [path]
    return paths


def rebuilt(text: str, results_dir: Path = RESULTS) -> tuple[str, list[str]]:
    """The markdown `text` with every marked table rebuilt, and the names of those that differed or are unknown."""
    lines = text.split("\n")
    differing = []
    for name, start, end in reversed(marked_blocks(lines)):
        if name not in TABLES:
            differing.append(f"{name} (no such table in src.tables.TABLES)")
            continue
        block = built_block(name, results_dir)
        if lines[start:end] != block:
            differing.append(name)
            lines[start:end] = block
    return "\n".join(lines), differing[::-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="rewrite the marked tables that differ")
    parser.add_argument("--publish", nargs=2, metavar=("RUN_JSON", "NAME"), help="copy a run's JSON into results/")
    args = parser.parse_args(argv)
    if args.publish:
        print(f"published {publish(*args.publish)}")
        return 0
    problems = 0
    for path in documents():
        text = path.read_text()
        new_text, differing = rebuilt(text)
        for name in differing:
            where = path.relative_to(PROJECT)
            print(f"{where}: table {name} differs from its results file" + (": rewritten" if args.write else ""))
        problems += len(differing)
        if args.write and new_text != text:
            path.write_text(new_text)
    if problems and not args.write:
        print("run `python -m src.tables --write` to rebuild them from results/", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
