"""README's side-by-side table: the paper's figures against src.reproduce's parts (the dry run, the CPU, the GPU), each
cell samples/s (x vanilla) where a clock ran, token slots per sample and effective token ratio. src.reproduce prints it
from runs/, src.tables builds README's from results/."""

from __future__ import annotations

# The paper's figures (Table 3 of arXiv 2305.13144 and its repository's README): Vicuna-7B on one A100, 1024 Alpaca
# val samples, group 256, batch 16, max length 512. Its predictor row is seqsch, the instruction-tuned Vicuna.
PAPER = {
    "vanilla": {"throughput": 1.39, "average_length": 370.84, "effective": 0.3391},
    "gt+vbs+fcr": {"throughput": 2.69, "average_length": 196.34, "effective": 0.6157},
    "predictor+vbs+fcr": {"throughput": 2.30, "average_length": 215.06, "effective": 0.4722},
}


# each part's column heading, in the table's order ({device}: the GPU's name as the run recorded it)
COLUMN_TITLES = {
    "dry": "dry run: no model, 1024 samples",
    "cpu": "CPU: SmolLM2-135M, 256 samples",
    "cpu-quick": "CPU quick: SmolLM2-135M, 96 samples",
    "gpu": "GPU: {device}, Vicuna-7B shape, 256 samples",
}
# The rows of the side-by-side table: (label, strategy in our results, key of the paper's figures)
SIDE_BY_SIDE_ROWS = (
    ("vanilla (no scheduling)", "vanilla", "vanilla"),
    ("oracle lengths + VBS + FCR", "gt+vbs+fcr", "gt+vbs+fcr"),
    ("predictor + VBS + FCR (paper: its Vicuna-7B LoRA; ours: proxy)", "proxy+vbs+fcr", "predictor+vbs+fcr"),
    ("proxy + FCR, failures resumed (ours)", "proxy+fcr+resume", None),
    ("continuous batching, FCFS, 16 slots", "continuous", None),
)


def result_cell(average_length: float, effective: float, throughput: float | None, baseline: float | None) -> str:
    """`2.30 (1.65x), 215.06, 47.2 %`: samples/s (x vanilla) where timed, token slots per sample, effective ratio."""
    timed = f"{throughput:.2f}" + (f" ({throughput / baseline:.2f}x)" if baseline else "") + ", " if throughput else ""
    return f"{timed}{average_length:.2f}, {effective * 100:.1f} %"


def side_by_side_table(outputs: dict[str, dict]) -> list[str]:
    """The paper against each part found: samples/s (x vanilla), token slots per sample (average length) and
    effective token ratio; the dry run has no clock, so it shows the last two."""
    columns = [name for name in COLUMN_TITLES if name in outputs]
    header = ["strategy", "the paper: A100, Vicuna-7B, 1024 samples"]
    header += [COLUMN_TITLES[name].format(device=outputs[name]["args"].get("device_name") or "GPU") for name in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for label, strategy, paper_key in SIDE_BY_SIDE_ROWS:
        cells = [label]
        paper = PAPER.get(paper_key) if paper_key else None
        if paper:
            baseline = PAPER["vanilla"]["throughput"]
            cells.append(result_cell(paper["average_length"], paper["effective"], paper["throughput"], baseline))
        else:
            cells.append("-")
        for name in columns:
            results = {result["strategy"]: result for result in outputs[name]["results"]}
            result, baseline = results.get(strategy), results.get("vanilla")
            if result is None:
                cells.append("not run")
                continue
            timed = not result["dry_run"]
            cells.append(
                result_cell(
                    result["average_length"],
                    result["effective_token_ratio"],
                    result["throughput_samples_per_s"] if timed else None,
                    baseline["throughput_samples_per_s"] if timed and baseline else None,
                )
            )
        lines.append("| " + " | ".join(cells) + " |")
    return lines
