"""What `src.infer` buys over plain batching on the paper's 256-sample val draw, in one process.

    python -m benchmarks.infer_speed replay --output-json runs/infer-replay.json
    python -m benchmarks.infer_speed parity --num-data 64 --repeats 3 --output-json runs/infer-parity.json
    python -m benchmarks.infer_speed real --predictor-path predictors/proxy-vicuna-7b ckpts/proxy-smollm2 \\
        --output-json runs/infer-real.json

replay: every request ends at Vicuna-7B's greedy length (`L_t0.0`), max 512 new tokens, as docs/CPU.md's table;
src.infer with --strategy vanilla, then with its default plan, then src.benchmark with the strategy that plan chose
on the same samples (the tool should cost nothing over the benchmark).
real: the model stops where it stops, max 256 new tokens; vanilla (static batches in file order), src.infer's default
plan (the cost model's cheapest; on this CPU one queue, shortest predicted first) once per predictor, transformers'
continuous-batching manager (FCFS), then proxy+fcr+resume (static batches of similar predicted length, cut and resumed);
every run's texts are compared with vanilla's, id by id, and each predictor's medians (as the answers record them)
with the lengths of vanilla's answers.
parity: replayed lengths as in replay; src.infer with the slots engine's queue (`continuous:proxy`, pinned) and
src.benchmark with the same strategy, `--repeats`
pairs, each pair in the other order, so the machine's drift falls on both alike; the figure is the median paired ratio.

The requests are the upstream draw (`--num-data 256 --seed 42` of data/alpaca-val-10k.json), written as FastChat
records, so src.infer and src.benchmark serve the same prompts. Answers and summaries go under `--work-dir`; the JSON
is rewritten after each run, so an interrupted script keeps what finished.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from src import benchmark, infer
from src.common.answers import read_complete_lines
from src.common.cli import check_output_dir, check_output_file, run_cli
from src.common.data import PAPER_VAL_DATA, default_length_path, load_conversations, select_samples
from src.common.provenance import provenance
from src.common.utils import UserError, write_json_atomic
from src.running.plan import QUEUE_CANDIDATES
from src.scheduling.metrics import length_metrics

LENGTHS = default_length_path(PAPER_VAL_DATA)


def write_requests(path: Path, num_data: int, seed: int) -> list[str]:
    samples = select_samples(load_conversations(PAPER_VAL_DATA), num_data, seed)
    records = [{"id": sample.id, "conversations": [{"from": "human", "value": sample.prompt}]} for sample in samples]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
    return [sample.id for sample in samples]


def rows_by_id(path: Path) -> dict[str, dict]:
    return {row["id"]: row for row in read_complete_lines(path)}


def run_benchmark(args: argparse.Namespace, strategy: str, max_length: int) -> dict:
    """src.benchmark on the same draw, replayed, with `strategy` and the first predictor."""
    return benchmark.main(
        ["--data-path", PAPER_VAL_DATA, "--num-data", str(args.num_data), "--seed", str(args.seed)]
        + ["--model", args.model, "--device", "cpu", "--dtype", args.dtype, "--max-length", str(max_length)]
        + ["--replay-lengths", LENGTHS, "--replay-field", "L_t0.0", "--strategies", strategy]
        + ["--predictor-path", args.predictor_path[0]]
    )["results"][0]


def measure_parity(args: argparse.Namespace, common: list[str], work: Path, max_length: int) -> dict:
    output = {"part": "parity", "max_length": max_length, "num_data": args.num_data, "provenance": provenance()}
    output["pairs"] = []
    for repeat in range(args.repeats):
        answers = work / f"default-{repeat}.jsonl"
        infer_flags = [*common, "--predictor-path", args.predictor_path[0], "--output", str(answers)]
        infer_flags += ["--strategy", QUEUE_CANDIDATES[0]]  # one strategy on both sides of every pair
        if repeat % 2:  # every other pair the benchmark goes first, so neither always runs on a warmer machine
            result = run_benchmark(args, QUEUE_CANDIDATES[0], max_length)
            summary = infer.main(infer_flags)
        else:
            summary = infer.main(infer_flags)
            result = run_benchmark(args, QUEUE_CANDIDATES[0], max_length)
        output["pairs"].append(
            {
                "strategy": summary["strategy"],
                "infer_requests_per_s": summary["requests_per_s"],
                "benchmark_samples_per_s": result["throughput_samples_per_s"],
                "infer_over_benchmark": summary["requests_per_s"] / result["throughput_samples_per_s"],
            }
        )
        output["median_infer_over_benchmark"] = statistics.median(
            pair["infer_over_benchmark"] for pair in output["pairs"]
        )
        write_json_atomic(args.output_json, output)
    print()
    for pair in output["pairs"]:
        print(
            f"src.infer {pair['infer_requests_per_s']:.3f} requests/s, src.benchmark "
            f"{pair['benchmark_samples_per_s']:.3f} samples/s: {pair['infer_over_benchmark']:.3f}"
        )
    print(f"median src.infer / src.benchmark: {output['median_infer_over_benchmark']:.3f}")
    return output


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=("replay", "real", "parity"))
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--num-data", type=int, default=256)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--max-length", type=int, default=None, help="default: 512 (replay), 256 (real)")
    parser.add_argument("--predictor-path", nargs="+", default=["predictors/proxy-vicuna-7b"])
    parser.add_argument("--repeats", type=int, default=3, help="parity: pairs of runs")
    parser.add_argument("--work-dir", default="runs/infer-speed")
    parser.add_argument("--output-json", required=True)
    args = parser.parse_args(argv)
    check_output_dir("--work-dir", args.work_dir)
    check_output_file("--output-json", args.output_json)
    work = Path(args.work_dir) / args.part
    if work.exists() and any(work.iterdir()):
        raise UserError(f"{work} holds an earlier run's answers: delete it, or choose another --work-dir")
    replayed = args.part in ("replay", "parity")
    max_length = args.max_length or (512 if replayed else 256)
    requests = work / "requests.jsonl"
    write_requests(requests, args.num_data, args.seed)
    common = ["--input", str(requests), "--model", args.model, "--device", "cpu", "--dtype", args.dtype]
    common += ["--max-length", str(max_length)]
    if replayed:
        common += ["--replay-lengths", LENGTHS, "--replay-field", "L_t0.0"]
    if args.part == "parity":
        return measure_parity(args, common, work, max_length)
    runs = [("vanilla", ["--strategy", "vanilla", "--engine", "transformers"])]
    runs += [(f"default:{path}", ["--predictor-path", path]) for path in args.predictor_path]
    if args.part == "replay":
        runs = runs[:2]
    else:  # what else a user might run on the same requests: transformers' manager, our static plan
        first_predictor = ["--predictor-path", args.predictor_path[0]]
        runs += [("continuous (manager)", ["--strategy", "continuous", "--engine", "transformers"])]
        runs += [("proxy+fcr+resume", ["--strategy", "proxy+fcr+resume", "--engine", "transformers", *first_predictor])]
    output = {"part": args.part, "max_length": max_length, "num_data": args.num_data, "provenance": provenance()}
    output["runs"] = {}
    for name, flags in runs:
        answers = work / f"{name.replace('/', '_').replace(':', '-').replace(' ', '_').strip('()')}.jsonl"
        summary = infer.main([*common, *flags, "--output", str(answers)])
        output["runs"][name] = {key: value for key, value in summary.items() if key != "settings"}
        output["runs"][name]["answers"] = str(answers)
        write_json_atomic(args.output_json, output)
    vanilla = output["runs"]["vanilla"]
    reference = rows_by_id(Path(vanilla["answers"]))
    for name, run in output["runs"].items():
        run["speedup_over_vanilla"] = run["requests_per_s"] / vanilla["requests_per_s"]
        run["latency_over_vanilla"] = run["mean_latency_s"] / vanilla["mean_latency_s"]
        rows = rows_by_id(Path(run["answers"]))
        run["texts_equal_to_vanilla"] = sum(rows[key].get("text") == reference[key].get("text") for key in reference)
        if name not in ("vanilla", "continuous (manager)"):  # the predictor against this model's own lengths
            run["predictor_on_these_lengths"] = length_metrics(
                [rows[key]["predicted_length"] for key in reference],
                [reference[key]["generated_tokens"] for key in reference],
            )
    if args.part == "replay":
        default_name = runs[1][0]
        plans = list(output["runs"][default_name]["groups_by_strategy"])
        if len(plans) != 1:  # groups of 256: a larger --num-data may plan its groups differently
            raise UserError(f"the default plan chose {', '.join(plans)}: compare with --num-data 256 or fewer")
        (strategy,) = plans
        result = run_benchmark(args, strategy, max_length)
        output["benchmark"] = {
            "strategy": strategy,
            "throughput_samples_per_s": result["throughput_samples_per_s"],
            "token_slots": result["token_slots"],
            "infer_over_benchmark": output["runs"][default_name]["requests_per_s"] / result["throughput_samples_per_s"],
        }
    write_json_atomic(args.output_json, output)
    print()
    for name, run in output["runs"].items():
        print(
            f"{name:<40} {run['requests_per_s']:.3f} requests/s ({run['speedup_over_vanilla']:.2f}x vanilla), mean "
            f"latency {run['mean_latency_s']:.1f} s ({run['latency_over_vanilla']:.2f}x), "
            f"{run['effective_token_ratio'] * 100:.1f} % effective, texts equal to vanilla's "
            f"{run['texts_equal_to_vanilla']}/{run['requests']}"
        )
        if "predictor_on_these_lengths" in run:
            metrics = run["predictor_on_these_lengths"]
            print(
                f"{'':<40} its predictor on these answers' lengths: Error {metrics['error']:.1f}, Acc-50 "
                f"{metrics['acc_50'] * 100:.1f} %, Acc-100 {metrics['acc_100'] * 100:.1f} %, Kendall's tau "
                f"{metrics['kendall_tau']:.3f}"
            )
    if "benchmark" in output:
        bench = output["benchmark"]
        print(
            f"src.benchmark {bench['strategy']}: {bench['throughput_samples_per_s']:.3f} samples/s; src.infer / "
            f"src.benchmark = {bench['infer_over_benchmark']:.3f}"
        )
    return output


if __name__ == "__main__":
    run_cli(main)
