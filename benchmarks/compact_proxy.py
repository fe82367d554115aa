"""Store a proxy predictor compactly and check what the compact copy costs: size, load time, accuracy.

    python -m benchmarks.compact_proxy --input ckpts/proxy-minilm --output predictors/proxy-vicuna-7b

The input is a predictor whose encoder is stored whole (as src.train_proxy wrote it before compact storage, 90 MB);
the output keeps only the encoder's difference from the packaged all-MiniLM-L6-v2 (src/predictors/proxy.py). Both
predict the first `--rows` val prompts; the script prints each one's Error, Acc-50, Acc-100 and Kendall's tau against
L_max, the largest change of any predicted length, the output's size and the time it takes to load, and writes them
to `--output-json`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from src.common.cli import check_output_dir, check_output_file, run_cli
from src.common.data import PAPER_VAL_DATA, default_length_path, load_conversations, load_max_lengths
from src.common.utils import UserError, write_json_atomic


def folder_megabytes(folder: Path) -> float:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file()) / 1e6


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="a predictor folder with its encoder stored whole")
    parser.add_argument("--output", required=True, help="the compact predictor folder to write")
    parser.add_argument("--rows", type=int, default=1000, help="first val rows to compare on")
    parser.add_argument("--output-json", default=None, help="write the comparison here")
    args = parser.parse_args(argv)
    check_output_dir("--output", args.output)
    check_output_file("--output-json", args.output_json)
    if Path(args.output).resolve() == Path(args.input).resolve():
        raise UserError("--output is --input: write the compact copy elsewhere")

    from src.predictors.proxy import LoadedProxy, resolve_encoder, save_proxy
    from src.scheduling.metrics import length_metrics

    full = LoadedProxy(args.input)
    config = {key: value for key, value in full.config.items() if key not in ("format", "quantiles", "encoder_storage")}
    save_proxy(full.model, full.tokenizer, args.output, config, base_encoder=resolve_encoder("minilm"))
    start = time.perf_counter()
    compact = LoadedProxy(args.output)
    load_seconds = time.perf_counter() - start

    samples = load_conversations(PAPER_VAL_DATA)[: args.rows]
    targets = load_max_lengths(default_length_path(PAPER_VAL_DATA))
    truth = [targets[sample.id] for sample in samples]
    prompts = [sample.prompt for sample in samples]
    result = {"rows": len(samples), "load_seconds": load_seconds, "megabytes": folder_megabytes(Path(args.output))}
    rows = {}
    for name, predictor in (("full", full), ("compact", compact)):
        rows[name] = predictor.predict_quantiles(prompts)
        result[name] = length_metrics([max(1, round(row[0])) for row in rows[name]], truth)
    result["largest_change_tokens"] = max(
        abs(a - b)
        for full_row, compact_row in zip(rows["full"], rows["compact"], strict=True)
        for a, b in zip(full_row, compact_row, strict=True)
    )
    for name in ("full", "compact"):
        metrics = result[name]
        print(
            f"{name:>8}: Error {metrics['error']:.2f}, Acc-50 {metrics['acc_50'] * 100:.2f} %, "
            f"Acc-100 {metrics['acc_100'] * 100:.2f} %, Kendall's tau {metrics['kendall_tau']:.4f}"
        )
    print(
        f"compact copy: {result['megabytes']:.1f} MB, loads in {load_seconds:.2f} s; the largest change of a predicted "
        f"length (any quantile) {result['largest_change_tokens']:.3f} tokens"
    )
    if args.output_json:
        write_json_atomic(args.output_json, result)
    return result


if __name__ == "__main__":
    run_cli(main)
