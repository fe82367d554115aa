"""Scheduled batch inference: predict lengths, schedule, generate, and report the paper's metrics.

    python -m src.benchmark --num-data 1024 --strategy gt --vbs --fcr          # the paper's command
    python -m src.benchmark --model smollm2-135m --data-path data/demo.json \\
        --strategies vanilla gt gt+vbs+fcr                                     # several, one table

Under torchrun or `accelerate launch` with K processes, process r runs groups r, r + K, ... (given the same
predictions, each group is scheduled as in one process, except that `--vbs-table auto` plans each process's table
from its own groups) and the main process merges the results: token slots, tokens and failures
add up, latency comes from every sample's own finish time, and throughput is all samples over the slowest
process's wall time.
"""

from __future__ import annotations

import argparse
import json

from .common.answers import answer_rows, keep_answers, lock_output
from .common.cli import (
    MAX_SEED,
    HelpFormatter,
    add_num_data_draw_argument,
    check_output_dir,
    check_output_file,
    check_outputs_are_not_inputs,
    check_range,
    check_temperature,
    run_cli,
)
from .common.data import (
    PAPER_VAL_DATA,
    default_length_path,
    load_conversations,
    load_replay_lengths,
    select_samples,
)
from .common.distributed import Processes, share_groups, start_processes
from .common.models import model_folder
from .common.provenance import provenance
from .common.utils import UserError, partial_path
from .engines.base import CONTINUOUS_SPEEDS, DEFAULT_CONTINUOUS_SPEED
from .predictors.flags import add_predictor_arguments, check_predictor_arguments, predictor_context
from .predictors.registry import build_predictor
from .running.cost_estimate import add_device_profile_argument, check_device_profile
from .running.report import print_result, print_table
from .running.result_file import (
    check_same_hardware,
    earlier_results,
    keep_finished,
    run_identity,
    run_record,
    write_complete,
)
from .running.runner import run_strategy
from .running.settings import (
    AUTO_SLOTS,
    AUTO_VBS_TABLE,
    RunSettings,
    equal_memory_slots,
    run_settings,
    strategy_choices,
)
from .running.setup import (
    add_model_arguments,
    build_predictors_without_model,
    check_model_arguments,
    dry_run_executors,
    load_model_with_engine,
    prepare_executors,
)
from .scheduling.batches import PAPER_VBS_TABLE, RESUME_RETRY_QUANTILES
from .scheduling.metrics import merge_process_results
from .scheduling.schedule import replay_executor

# the flags that name files or folders the run reads: none may be an output, and a resumed run must find them unchanged
INPUT_FLAGS = (
    *("--data-path", "--replay-lengths", "--length-path"),
    *("--predictions-path", "--predictor-path", "--lora-path"),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--data-path", default=PAPER_VAL_DATA, help="FastChat conversations, or src.infer requests")
    add_model_arguments(parser)
    parser.add_argument("--seed", type=int, default=42, help="seed of the sample draw and of sampling")
    add_num_data_draw_argument(parser)
    parser.add_argument("--debug", action="store_true", help="print one line per batch")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (the paper's setting)")
    parser.add_argument("--max-length", type=int, default=512, help="most new tokens a sample may generate")
    parser.add_argument("--batch-size", type=int, default=16, help="batch size (without VBS, and for FCR recompute)")
    parser.add_argument("--group-size", type=int, default=256, help="samples scheduled together")
    parser.add_argument("--strategy", default="vanilla", help=f"how samples are batched: {strategy_choices()}")
    parser.add_argument(
        "--strategies",
        nargs="+",
        default=None,
        help="run several in one process on the same samples, e.g. vanilla gt gt+vbs+fcr; overrides --strategy",
    )
    parser.add_argument(
        "--order",
        choices=("fcfs", "predicted"),
        default="fcfs",
        help="admission order of --strategy continuous: data order, or shortest --order-predictor first",
    )
    parser.add_argument("--order-predictor", default="gt", help="the predictor of --order predicted")
    parser.add_argument(
        "--slots",
        default=None,
        help="continuous batching: most concurrent requests; default --batch-size; auto: as many as the KV-cache "
        "memory of the largest static batch that ran before it in this command holds (equal memory)",
    )
    parser.add_argument(
        "--continuous-speed",
        choices=CONTINUOUS_SPEEDS,
        default=DEFAULT_CONTINUOUS_SPEED,
        help="continuous batching's step on CUDA: graphs = CUDA graphs and asynchronous batching, and flash attention "
        "where its package is installed; plain = transformers' defaults for the model's attention (no graphs with "
        "sdpa); compiled = graphs and a compiled step (a compilation at the start). Elsewhere graphs runs as plain",
    )
    parser.add_argument(
        "--arrival-rate",
        type=float,
        default=None,
        help="dry run, continuous batching: requests arrive in data order at this many per decode step (default: all "
        "at once); the predictor of continuous:NAME orders the waiting ones",
    )
    parser.add_argument(
        "--aging",
        type=float,
        default=0.0,
        help="with --arrival-rate: a waiting request's predicted length counts this many tokens less per step waited, "
        "so long requests are not starved (0: pure shortest-predicted-first)",
    )
    parser.add_argument("--lora-path", default=None, help="peft LoRA adapter of the length perception module")
    parser.add_argument("--vbs", action="store_true", help="variable batch size by predicted-length bucket")
    parser.add_argument("--fcr", action="store_true", help="cap batches at their prediction; recompute failures")
    parser.add_argument(
        "--vbs-table",
        default=",".join(f"{bucket}:{size}" for bucket, size in PAPER_VBS_TABLE.items()),
        help="bucket:batch_size pairs for VBS (default: the paper's A100 table; other buckets get 16), or auto: "
        "calibrate decode steps on the device and pick each bucket's batch size for the shortest estimated time",
    )
    parser.add_argument(
        "--length-path", default=None, help="length file for gt; default: the data path with -length before .json"
    )
    parser.add_argument(
        "--replay-lengths", default=None, help="length file: every sample ends exactly at its recorded length"
    )
    parser.add_argument("--replay-field", default="L_t0.0", help="the length file's field to replay")
    add_predictor_arguments(parser)
    parser.add_argument(
        "--bucket-predictions",
        action="store_true",
        help="round every prediction up to its 50-token bucket, as the paper's trained predictor answers",
    )
    parser.add_argument(
        "--fcr-quantile",
        type=float,
        default=None,
        help="FCR caps each batch at its members' largest upper-quantile length (e.g. 0.8) instead of the "
        "prediction; needs a predictor with quantiles (proxy)",
    )
    parser.add_argument(
        "--fcr-retry-quantiles",
        nargs="+",
        default=None,
        metavar="Q",
        help="+resume strategies retry their failures once per level, each retry capped at the failures' Q-quantile "
        "lengths (at least 50 tokens past where each stopped), before the last retry at --max-length; 'none' for "
        f"none; default {' '.join(map(str, RESUME_RETRY_QUANTILES))} with a predictor with quantiles (proxy)",
    )
    parser.add_argument(
        "--gt-field", default=None, help="oracle column for gt, e.g. L_t0.0; default L_max over the temperatures"
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="no model: every sample ends at its --replay-lengths length; the same scheduler and metrics, in seconds",
    )
    parser.add_argument(
        "--inject-oom-above",
        type=int,
        default=None,
        help="testing: raise an out-of-memory error for static batches above this size, to exercise the back-off",
    )
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up batch")
    add_device_profile_argument(parser)
    parser.add_argument("--output-json", default=None, help="write every metric and the arguments here")
    parser.add_argument(
        "--answers-dir",
        default=None,
        help="keep the answers: one JSON line per sample, as src.infer writes them, in DIR/STRATEGY.jsonl (static "
        "strategies of real runs)",
    )
    args = parser.parse_args(argv)
    for flag, value in (
        ("--max-length", args.max_length),
        ("--batch-size", args.batch_size),
        ("--group-size", args.group_size),
        ("--num-data", args.num_data),
        ("--inject-oom-above", args.inject_oom_above),
    ):
        check_range(flag, value, 1)
    check_predictor_arguments(args)
    check_range("--arrival-rate", args.arrival_rate, 0, open_low=True)
    check_range("--aging", args.aging, 0)
    if args.arrival_rate is not None and not args.dry_run:
        raise UserError("--arrival-rate runs in the dry run only (the iteration model): add --dry-run")
    check_device_profile(args)
    check_range("--seed", args.seed, 0, MAX_SEED)
    check_temperature("--temperature", args.temperature)
    check_range("--fcr-quantile", args.fcr_quantile, 0, 1, open_low=True, open_high=True)
    check_output_file("--output-json", args.output_json)
    check_output_dir("--answers-dir", args.answers_dir)
    if args.answers_dir and args.dry_run:
        raise UserError("--answers-dir keeps generated answers, and a dry run generates none: leave out --dry-run")
    if args.vbs_table == AUTO_VBS_TABLE and args.dry_run:
        raise UserError("--vbs-table auto calibrates on the device and cannot run with --dry-run: pass a table")
    if args.dry_run and not args.replay_lengths:
        raise UserError("--dry-run needs --replay-lengths: the lengths stand in for the model")
    if args.length_path is None:
        args.length_path = default_length_path(args.data_path)
    inputs = {flag: getattr(args, flag[2:].replace("-", "_")) for flag in INPUT_FLAGS}
    inputs["--model"] = None if args.dry_run else model_folder(args.model)
    check_outputs_are_not_inputs({"--output-json": args.output_json}, inputs, {"--answers-dir": args.answers_dir})
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    settings = run_settings(args)
    inputs = {flag: getattr(args, flag[2:].replace("-", "_")) for flag in INPUT_FLAGS}
    identity = run_identity(json.loads(json.dumps(vars(args))), inputs)  # as given: what a resumed run must match
    processes = start_processes(args.device)
    args.device = processes.device(args.device)
    # one run per result file: another would overwrite the partial file this one keeps its finished strategies in
    lock = lock_output(args.output_json, processes, "--output-json") if args.output_json else None
    try:
        return run_benchmark(args, settings, identity, processes)
    finally:
        if lock is not None:
            lock.__exit__(None, None, None)


def run_benchmark(args, settings: RunSettings, identity: dict, processes: Processes) -> dict:
    """Every strategy measured in turn (those an interrupted run of this command finished are kept), the result file
    written once at the end."""
    all_samples = select_samples(load_conversations(args.data_path), args.num_data, args.seed)
    samples = share_groups(all_samples, args.group_size, processes)
    # every process checks every id, so that all fail alike
    replay = load_replay_lengths(args.replay_lengths, args.replay_field, [sample.id for sample in all_samples])
    replay = {sample.id: replay[sample.id] for sample in samples} if replay is not None else None
    context = predictor_context(args)
    predictors = build_predictors_without_model(args, settings, context, all_samples)
    settings = settings.with_predictors(predictors)  # a quantile level a predictor lacks fails here
    earlier, earlier_record = earlier_results(args.output_json, identity, processes)  # before the model loads
    if args.dry_run:
        model_path, device = None, "cpu"
        executors = dry_run_executors(replay_executor(replay), settings.device_profile, samples)
        if processes.is_main:
            print(f"dry run: no model, {len(all_samples)} samples from {args.data_path} end at {args.replay_field}")
    else:
        check_model_arguments(args)  # after the data and flag checks, so that a mistake there is named first
        loaded = load_model_with_engine(args, context)
        model_path, device = loaded.path, loaded.engine.device
        if processes.is_main:
            print(
                f"model: {loaded.path} on {device} ({next(loaded.model.parameters()).dtype}), template "
                f"{loaded.formatter.template}, {len(samples)} samples from {args.data_path}"
                + (f", replaying {args.replay_field}" if replay else "")
                + (f" in process 0 of {processes.count}" if processes.distributed else "")
            )
        executors = prepare_executors(settings, loaded, samples, replay, processes, warmup=not args.no_warmup)
    for strategy in settings.strategies:
        if strategy.predictor not in predictors:
            predictors[strategy.predictor] = build_predictor(strategy.predictor, context)
    output = {"args": run_record(args, settings, executors, model_path, device, processes), "results": []}
    output["provenance"] = provenance(device)  # the command, commit, date and machine that a published figure names
    if earlier:
        check_same_hardware(args.output_json, earlier_record, output["args"])
    for strategy in settings.strategies:
        if strategy.label in earlier:  # finished by an interrupted run of this same command
            if processes.is_main:
                print(f"{strategy.label}: kept from the interrupted run ({partial_path(args.output_json)})\n")
                output["results"].append(earlier[strategy.label])
            continue
        result = run_one_strategy(
            strategy, args, settings, samples, all_samples, predictors, executors, device, replay, processes, output
        )
        if result is None:  # not the main process: the main one holds the merged results
            continue
        print_result(result)
        output["results"].append(result)
        if args.output_json:  # beside the output after each strategy: finished results survive a later failure
            keep_finished(args.output_json, output, identity)
    if len(output["results"]) > 1:
        print_table(output["results"])
    if args.output_json and processes.is_main:  # complete: only now does it replace an earlier complete file
        write_complete(args.output_json, output)
    return output


def run_one_strategy(
    strategy, args, settings, samples, all_samples, predictors, executors, device, replay, processes, output
):
    """One strategy in every process; the main process returns the merged result and keeps its answers."""
    processes.wait()  # the processes start each strategy together, so the slowest one's time is the run's
    slots = settings.slots
    if strategy.continuous and slots == AUTO_SLOTS:
        # the main process holds the merged results; every process runs with its figure
        longest_prompt = output["args"]["longest_prompt_tokens"]
        slots = equal_memory_slots(output["results"], longest_prompt, settings.max_length, settings.batch_size)
        slots = processes.broadcast(slots if processes.is_main else None)
        if processes.is_main:
            print(f"slots auto for {strategy.label}: {slots} (the KV cache of the largest static batch before it)")
    finals = {}  # id -> (its final result, the attempt that gave it)
    result = run_strategy(
        strategy,
        settings,
        samples,
        predictors[strategy.predictor],
        executors,
        device,
        replay,
        processes.is_main,
        slots,
        on_result=lambda final, executed: finals.update({final.id: (final, executed.batch.attempt + 1)}),
    )
    answers = answer_rows(result, finals, executors.prompt_lengths) if args.answers_dir else []
    all_ids = [sample.id for sample in all_samples]
    result = merge_process_results(processes.gather(result), all_ids)
    answers = [row for rows in processes.gather(answers) for row in rows]
    if not processes.is_main:
        return None
    if answers:
        path = keep_answers(args.answers_dir, strategy.label, answers, all_ids)
        print(f"answers of {strategy.label}: {path}")
    return result


if __name__ == "__main__":
    run_cli(main)
