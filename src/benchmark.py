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

from .common.cli import (
    MAX_SEED,
    HelpFormatter,
    add_model_arguments,
    add_num_data_draw_argument,
    add_predictor_arguments,
    check_model_arguments,
    check_output_dir,
    check_output_file,
    check_predictor_arguments,
    check_range,
    predictor_context,
    run_cli,
)
from .common.data import (
    PAPER_VAL_DATA,
    default_length_path,
    load_conversations,
    load_length_file,
    require_ids,
    select_samples,
)
from .common.distributed import Processes, start_processes
from .common.utils import (
    UserError,
    describe_device,
    library_versions,
    write_json_atomic,
)
from .predictors.registry import PREDICTORS, build_predictor
from .running.strategies import (
    AUTO_SLOTS,
    CONTINUOUS,
    RESUME_RETRY_QUANTILES,
    Executors,
    StaticBatchExecutor,
    equal_memory_slots,
    parse_strategy,
    require_quantiles,
    resume_retry_levels,
    run_strategy,
    share_groups,
)
from .running.vbs_auto import CANDIDATE_BATCH_SIZES
from .scheduling.metrics import merge_process_results
from .scheduling.schedule import (
    PAPER_VBS_TABLE,
    parse_vbs_table,
    replay_executor,
)


def parse_retry_quantiles(values: list[str] | None) -> list[float] | None:
    """`--fcr-retry-quantiles`: None (not given: the default), [] for `none`, else levels strictly between 0 and 1."""
    if values is None:
        return None
    if [value.lower() for value in values] == ["none"]:
        return []
    levels = []
    for value in values:
        try:
            levels.append(float(value))
        except ValueError:
            raise UserError(f"--fcr-retry-quantiles expected levels such as 0.8 0.95 or none, got {value!r}") from None
        check_range("--fcr-retry-quantiles", levels[-1], 0, 1, open_low=True, open_high=True)
    return levels


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--data-path", default=PAPER_VAL_DATA, help="FastChat conversation file")
    add_model_arguments(parser)
    parser.add_argument("--seed", type=int, default=42, help="seed of the sample draw and of sampling")
    add_num_data_draw_argument(parser)
    parser.add_argument("--debug", action="store_true", help="print one line per batch")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (the paper's setting)")
    parser.add_argument("--max-length", type=int, default=512, help="most new tokens a sample may generate")
    parser.add_argument("--batch-size", type=int, default=16, help="batch size (without VBS, and for FCR recompute)")
    parser.add_argument("--group-size", type=int, default=256, help="samples scheduled together")
    parser.add_argument("--strategy", default="vanilla", help=f"length predictor: {', '.join(sorted(PREDICTORS))}")
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
    if args.slots is not None and args.slots != AUTO_SLOTS:
        try:
            args.slots = int(args.slots)
        except ValueError:
            raise UserError(f"--slots expected a number of slots or {AUTO_SLOTS}, got {args.slots!r}") from None
        check_range("--slots", args.slots, 1)
    check_range("--arrival-rate", args.arrival_rate, 0, open_low=True)
    check_range("--aging", args.aging, 0)
    if args.arrival_rate is not None and not args.dry_run:
        raise UserError("--arrival-rate runs in the dry run only (the iteration model): add --dry-run")
    check_range("--seed", args.seed, 0, MAX_SEED)
    check_range("--temperature", args.temperature, 0)
    check_range("--fcr-quantile", args.fcr_quantile, 0, 1, open_low=True, open_high=True)
    args.fcr_retry_quantiles = parse_retry_quantiles(args.fcr_retry_quantiles)
    check_output_file("--output-json", args.output_json)
    check_output_dir("--answers-dir", args.answers_dir)
    if args.answers_dir and args.dry_run:
        raise UserError("--answers-dir keeps generated answers, and a dry run generates none: leave out --dry-run")
    args.vbs_table_parsed = None  # auto: chosen per strategy from a calibration on the device
    if args.vbs_table != "auto":
        try:
            args.vbs_table_parsed = parse_vbs_table(args.vbs_table)
        except ValueError as error:
            raise UserError(f"--vbs-table: {error}") from None
    elif args.dry_run:
        raise UserError("--vbs-table auto calibrates on the device and cannot run with --dry-run: pass a table")
    if args.dry_run and not args.replay_lengths:
        raise UserError("--dry-run needs --replay-lengths: the lengths stand in for the model")
    if args.slots is None:
        args.slots = args.batch_size
    texts = args.strategies or [args.strategy]
    if args.strategies is None and args.strategy == CONTINUOUS and args.order == "predicted":
        texts = [f"{CONTINUOUS}:{args.order_predictor}"]
    args.strategy_list = [parse_strategy(text, args.vbs, args.fcr) for text in texts]
    static = [strategy.label for strategy in args.strategy_list if not strategy.continuous]
    if args.arrival_rate is not None and static:
        raise UserError(
            f"--arrival-rate applies to continuous batching only; {static[0]!r} is a static strategy whose latency "
            "counts from the start: run it in another command"
        )
    for strategy in args.strategy_list:  # before the first strategy runs and writes its result
        if args.fcr_quantile is not None:
            require_quantiles(strategy)
        resume_retry_levels(strategy, args.fcr_retry_quantiles)
    if args.fcr_retry_quantiles and not any(strategy.resume for strategy in args.strategy_list):
        raise UserError("--fcr-retry-quantiles caps the retries of +resume strategies, and none is asked for")
    if args.length_path is None:
        args.length_path = default_length_path(args.data_path)
    return args


def print_result(result: dict) -> None:
    print(f"Strategy: {result['strategy']}, VBS: {result['vbs']}, FCR: {result['fcr']}")
    print(
        f"Total samples: {result['num_samples']}, Group size: {result['group_size']}, "
        f"Batch size: {result['batch_size']}, Max length: {result['max_length']}"
    )
    if result["processes"] > 1:
        line = "Processes: " + str(result["processes"])
        line += ", decode steps " + " / ".join(str(steps) for steps in result["process_decode_steps"])
        if not result["dry_run"]:
            line += ", wall " + " / ".join(f"{seconds:.2f}" for seconds in result["process_wall_times_s"]) + " s"
        print(line)
    if not result["dry_run"]:
        print(
            f"Time: {result['wall_time_s']:.2f} s (prediction {result['prediction_time_s']:.2f} s, "
            f"generation {result['generation_time_s']:.2f} s)"
        )
        print(f"Throughput: {result['throughput_samples_per_s']:.3f} samples/s")
        if result.get("engine_warmup_s"):
            print(f"Engine warm-up: {result['engine_warmup_s']:.2f} s (compiling new shapes; not in the time above)")
    print(f"Average length: {result['average_length']:.2f} tokens")
    print(f"Effective token ratio: {result['effective_token_ratio'] * 100:.2f} %")
    print(f"Failure ratio: {result['failure_ratio'] * 100:.2f} %")
    if result.get("resume"):
        levels = " ".join(str(level) for level in result["fcr_retry_quantiles"]) or "none"
        reused = sum(batch.get("kv_reused_tokens", 0) for batch in result["batches"])
        print(
            f"Resumed: {result['resumed_tokens']} tokens carried over, {reused} prompt tokens served from kept KV "
            f"caches (retries capped at quantiles {levels}, then at the max length)"
        )
    latency = (
        f"Latency: mean {result['mean_latency_steps']:.0f} steps, p90 {result['p90_latency_steps']:.0f} steps, "
        f"max {result['max_latency_steps']:.0f} steps"
    )
    if not result["dry_run"]:
        latency += f" (mean {result['mean_latency_s']:.2f} s, p90 {result['p90_latency_s']:.2f} s)"
    print(latency)
    if result["unparsable_predictions"]:
        print(f"Unparsable predictions: {result['unparsable_predictions']} (given the max length)")
    rate = "" if result["dry_run"] else f" ({result['generated_tokens_per_s']:.1f} tokens/s)"
    print(f"Generated tokens: {result['generated_tokens']}{rate}")
    print()


def print_table(results: list[dict]) -> None:
    """One line per strategy. Latency is in decode steps in a dry run, in seconds otherwise."""
    baseline = next((result for result in results if result["strategy"] == "vanilla"), None)
    unit = "steps" if results[0]["dry_run"] else "s"
    header = (
        f"{'strategy':<20}{'samples/s':>11}{'avg length':>12}{'effective':>11}{'failure':>9}"
        f"{'latency ' + unit:>15}{'p90 ' + unit:>11}{'speed-up':>10}"
    )
    print(header)
    print("-" * len(header))
    for result in results:
        speedup = (
            f"{result['throughput_samples_per_s'] / baseline['throughput_samples_per_s']:.2f}x" if baseline else "n/a"
        )
        throughput = f"{result['throughput_samples_per_s']:.3f}"
        if result["dry_run"]:  # no generation was timed: only the token columns mean anything
            speedup = throughput = "-"
        print(
            f"{result['strategy']:<20}{throughput:>11}{result['average_length']:>12.2f}"
            f"{result['effective_token_ratio'] * 100:>10.2f}%{result['failure_ratio'] * 100:>8.2f}%"
            f"{result[f'mean_latency_{unit}']:>15.1f}{result[f'p90_latency_{unit}']:>11.1f}{speedup:>10}"
        )


def prepare_model(args, samples, replay, context, processes=None):
    """Load the model, give it to the predictors that need one, and build the generation executor.
    Under several processes each prepares its own samples and the main one calibrates VBS auto for all."""
    processes = processes or Processes()
    check_model_arguments(args)  # after the data and flag checks, so that a mistake there is named first
    from .common.models import load_model_and_formatter
    from .engines.registry import build_engine

    model, tokenizer, formatter, model_path = load_model_and_formatter(
        args.model, args.device, args.dtype, args.lora_path, args.load_format, args.conv_template
    )
    device = str(model.device)
    engine = build_engine(args.engine, model, tokenizer)
    context.model, context.tokenizer, context.formatter, context.engine = model, tokenizer, formatter, engine
    prompt_ids = {sample.id: formatter.encode(sample.prompt) for sample in samples}
    if processes.is_main:
        print(
            f"model: {model_path} on {device} ({next(model.parameters()).dtype}), template {formatter.template}, "
            f"{len(samples)} samples from {args.data_path}"
            + (f", replaying {args.replay_field}" if replay else "")
            + (f" in process 0 of {processes.count}" if processes.distributed else "")
        )
    if not args.no_warmup:  # the first call pays one-off costs (allocator, kernels) that no strategy should carry
        engine.generate([prompt_ids[samples[0].id]], 2, args.temperature)
        if engine.warmup_seconds and processes.is_main:
            print(f"engine {engine.name}: first compilation {engine.warmup_seconds:.1f} s, before any strategy")
    run_batch = StaticBatchExecutor(engine, prompt_ids, args.temperature, replay, args.debug, args.inject_oom_above)

    def run_continuous(order, slots, on_result):
        return engine.run_queue(
            order, prompt_ids, args.max_length, slots, args.temperature, replay, on_result, args.seed
        )

    step_costs, calibration = None, None
    mean_prompt_length = sum(len(ids) for ids in prompt_ids.values()) / len(prompt_ids)
    if args.vbs_table_parsed is None and any(strategy.vbs for strategy in args.strategy_list):
        from .running.vbs_auto import describe, timed_calibration

        # on a CPU the calibration's prefills of more than 64 rows take minutes; larger sizes are extrapolated
        largest = max(CANDIDATE_BATCH_SIZES) if model.device.type == "cuda" else 64
        if processes.is_main:  # one calibration, so that every process plans from the same costs
            step_costs, seconds = timed_calibration(engine, largest, round(mean_prompt_length) + args.max_length)
        step_costs, seconds = processes.broadcast((step_costs, seconds) if processes.is_main else None)
        calibration = step_costs.to_json() | {"seconds": seconds}
        if processes.is_main:
            print(describe(step_costs, seconds))
    prompt_lengths = {sample_id: len(ids) for sample_id, ids in prompt_ids.items()}
    return (
        model_path,
        device,
        Executors(run_batch, run_continuous, step_costs, mean_prompt_length, calibration, prompt_lengths),
    )


def answer_rows(result: dict, finals: dict, prompt_lengths: dict | None) -> list[dict]:
    """This process's answer lines of a static strategy (src.common.answers), from the final results that
    run_schedule told."""
    from .common.answers import answer_row

    rows = []
    for sample in result["samples"]:
        if sample["id"] in finals:
            final, attempts = finals[sample["id"]]
            prompt_tokens = (prompt_lengths or {}).get(sample["id"], 0)
            rows.append(
                answer_row(
                    final.id, final.text, prompt_tokens, final.length, final.finished, sample["prediction"], attempts
                )
            )
    return rows


def keep_answers(folder: str, label: str, rows: list[dict], ids: list[str]) -> str:
    """DIR/LABEL.jsonl, in data order, written in one step."""
    from pathlib import Path

    from .common.answers import write_answer_file

    order = {sample_id: index for index, sample_id in enumerate(ids)}
    path = Path(folder) / f"{label.replace(':', '-')}.jsonl"
    write_answer_file(path, sorted(rows, key=lambda row: order[row["id"]]))
    return str(path)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    processes = start_processes(args.device)
    args.device = processes.device(args.device)
    all_samples = select_samples(load_conversations(args.data_path), args.num_data, args.seed)
    all_ids = [sample.id for sample in all_samples]
    samples = share_groups(all_samples, args.group_size, processes)
    replay = None
    if args.replay_lengths:
        table = load_length_file(args.replay_lengths, (args.replay_field,))
        require_ids(table, all_ids, args.replay_lengths)  # every process checks every id: all fail alike
        replay = {sample.id: int(table[sample.id][args.replay_field]) for sample in samples}

    context = predictor_context(args)
    predictors = {}
    for strategy in args.strategy_list:  # predictors without a model fail fast, before the model loads
        if args.dry_run and PREDICTORS[strategy.predictor].needs_model:
            raise UserError(f"strategy {strategy.predictor} needs a model and cannot run with --dry-run")
        if strategy.predictor not in predictors and not PREDICTORS[strategy.predictor].needs_model:
            predictors[strategy.predictor] = build_predictor(strategy.predictor, context)
            if PREDICTORS[strategy.predictor].uses_length_file:
                predictors[strategy.predictor].predict(all_samples)  # checks every id has a row
        levels = [args.fcr_quantile] if strategy.fcr and args.fcr_quantile is not None else []
        available = getattr(predictors.get(strategy.predictor), "quantile_levels", None)
        levels += resume_retry_levels(strategy, args.fcr_retry_quantiles, available)
        if levels and hasattr(predictors.get(strategy.predictor), "require_quantile"):
            for level in levels:  # a level the predictor lacks fails here, not after earlier strategies ran
                predictors[strategy.predictor].require_quantile(level)

    if args.dry_run:
        model_path, device = None, "cpu"
        executors = Executors(replay_executor(replay))
        if processes.is_main:
            print(f"dry run: no model, {len(all_ids)} samples from {args.data_path} end at {args.replay_field}")
    else:
        model_path, device, executors = prepare_model(args, samples, replay, context, processes)
    for strategy in args.strategy_list:
        if strategy.predictor not in predictors:
            predictors[strategy.predictor] = build_predictor(strategy.predictor, context)

    output = {"args": {key: value for key, value in vars(args).items() if key != "strategy_list"}, "results": []}
    output["args"]["strategies"] = [strategy.label for strategy in args.strategy_list]
    output["args"]["model_path"] = model_path
    if executors.calibration is not None:  # what --vbs-table auto measured, beside the arguments as before
        output["args"]["vbs_calibration"] = executors.calibration
    longest_prompt = max(executors.prompt_lengths.values()) if executors.prompt_lengths else 0
    output["args"]["longest_prompt_tokens"] = longest_prompt  # None known in the dry run: 0
    output["args"]["device_resolved"] = device
    output["args"]["engine_resolved"] = executors.run_batch.engine.name if not args.dry_run else None
    output["args"]["device_name"] = None if args.dry_run else describe_device(device)
    output["args"]["versions"] = library_versions()
    output["args"]["processes"] = processes.count
    for strategy in args.strategy_list:
        processes.wait()  # the processes start each strategy together, so the slowest one's time is the run's
        slots = args.slots
        if strategy.continuous and args.slots == AUTO_SLOTS:
            # the main process holds the merged results; every process runs with its figure
            slots = equal_memory_slots(output["results"], longest_prompt, args.max_length, args.batch_size)
            slots = processes.broadcast(slots if processes.is_main else None)
            if processes.is_main:
                print(f"slots auto for {strategy.label}: {slots} (the KV cache of the largest static batch before it)")
        finals = {}  # id -> (its final result, the attempt that gave it)
        result = run_strategy(
            strategy,
            args,
            samples,
            predictors[strategy.predictor],
            executors,
            device,
            replay,
            processes.is_main,
            slots,
            on_result=lambda final, executed, finals=finals: finals.update(
                {final.id: (final, executed.batch.attempt + 1)}
            ),
        )
        answers = answer_rows(result, finals, executors.prompt_lengths) if args.answers_dir else []
        result = merge_process_results(processes.gather(result), all_ids)
        answers = [row for rows in processes.gather(answers) for row in rows]
        if not processes.is_main:
            continue
        if answers:
            path = keep_answers(args.answers_dir, strategy.label, answers, all_ids)
            print(f"answers of {strategy.label}: {path}")
        print_result(result)
        output["results"].append(result)
        if args.output_json:  # after each strategy, so finished results survive a later failure
            write_json_atomic(args.output_json, output)
    if len(output["results"]) > 1:
        print_table(output["results"])
    return output


if __name__ == "__main__":
    run_cli(main)
