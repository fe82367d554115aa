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
import time
from dataclasses import asdict, dataclass

from .cli import add_model_arguments, run_cli
from .data import default_length_path, load_conversations, load_length_file, require_ids, select_samples
from .distributed import Processes, start_processes
from .metrics import compute_continuous_metrics, compute_metrics, latency_metrics, merge_process_results
from .predictors import PREDICTORS, PredictorContext, build_predictor
from .schedule import (
    PAPER_VBS_TABLE,
    Batch,
    BatchOutcome,
    ContinuousRecord,
    ScheduleConfig,
    admission_order,
    bucket_of,
    clamp_prediction,
    final_batches,
    parse_vbs_table,
    replay_executor,
    run_schedule,
    simulate_continuous,
)
from .utils import (
    Timer,
    UserError,
    describe_device,
    library_versions,
    resolve_device,
    set_seed,
    write_json_atomic,
)
from .vbs_auto import CANDIDATE_BATCH_SIZES

STRATEGY_MODIFIERS = ("vbs", "fcr")
CONTINUOUS = "continuous"


@dataclass(frozen=True)
class Strategy:
    predictor: str
    vbs: bool = False
    fcr: bool = False
    continuous: bool = False  # iteration-level batching; with predictor vanilla, admission in data order

    @property
    def label(self) -> str:
        if self.continuous:
            return CONTINUOUS if self.predictor == "vanilla" else f"{CONTINUOUS}:{self.predictor}"
        return "+".join([self.predictor] + [name for name in STRATEGY_MODIFIERS if getattr(self, name)])


def parse_strategy(text: str, vbs: bool = False, fcr: bool = False) -> Strategy:
    """`gt+vbs+fcr` -> Strategy('gt', True, True); --vbs/--fcr add to every strategy but vanilla,
    which is the unscheduled baseline by definition. `continuous` is continuous batching in data order
    (FCFS), `continuous:gt` admits shortest predicted first (any predictor); VBS and FCR do not apply to it."""
    text = text.strip()
    if text == CONTINUOUS or text.startswith(CONTINUOUS + ":"):
        _, _, order_by = text.partition(":")
        if order_by and order_by not in PREDICTORS:
            raise UserError(f"unknown predictor {order_by!r} in {text!r}: choose from {', '.join(sorted(PREDICTORS))}")
        return Strategy(order_by or "vanilla", continuous=True)
    name, *modifiers = text.split("+")
    if name == CONTINUOUS:
        raise UserError(f"{text!r}: VBS and FCR do not apply to continuous batching, which has no batch to cut")
    if name not in PREDICTORS:
        raise UserError(f"unknown strategy {name!r}: choose from {', '.join(sorted(PREDICTORS))}")
    unknown = [modifier for modifier in modifiers if modifier not in STRATEGY_MODIFIERS]
    if unknown:
        raise UserError(f"unknown strategy modifier {unknown[0]!r} in {text!r}: use +vbs and/or +fcr")
    if name == "vanilla":
        return Strategy("vanilla")
    return Strategy(name, vbs or "vbs" in modifiers, fcr or "fcr" in modifiers)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-path", default="./data/alpaca-val-10k.json", help="FastChat conversation file")
    add_model_arguments(parser)
    parser.add_argument("--seed", type=int, default=42, help="seed of the sample draw and of sampling")
    parser.add_argument("--num-data", type=int, default=None, help="draw this many samples as upstream; default all")
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
        "--slots", type=int, default=None, help="continuous batching: most concurrent requests; default --batch-size"
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
    parser.add_argument(
        "--prediction-batch-size", type=int, default=128, help="prompts per length-prediction batch (po, seqsch)"
    )
    parser.add_argument("--constant-length", type=int, default=None, help="the length of strategy constant")
    parser.add_argument(
        "--bucket-predictions",
        action="store_true",
        help="round every prediction up to its 50-token bucket, as the paper's trained predictor answers",
    )
    parser.add_argument(
        "--predictor-path", default=None, help="folder of a proxy predictor (python -m src.train_proxy)"
    )
    parser.add_argument(
        "--fcr-quantile",
        type=float,
        default=None,
        help="FCR caps each batch at its members' largest upper-quantile length (e.g. 0.8) instead of the "
        "prediction; needs a predictor with quantiles (proxy)",
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
    args = parser.parse_args(argv)
    for name in ("max_length", "batch_size", "group_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
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
    if args.slots < 1:
        raise UserError("--slots must be at least 1")
    texts = args.strategies or [args.strategy]
    if args.strategies is None and args.strategy == CONTINUOUS and args.order == "predicted":
        texts = [f"{CONTINUOUS}:{args.order_predictor}"]
    args.strategy_list = [parse_strategy(text, args.vbs, args.fcr) for text in texts]
    if args.length_path is None:
        args.length_path = default_length_path(args.data_path)
    return args


def make_run_batch(model, tokenizer, prompt_ids, temperature, replay, debug, fail_above=None):
    """The executor: one scheduled batch through `generate_batch`, split in halves on out-of-memory errors
    (counted in `run_batch.oom_splits`)."""
    from .generate import eos_token_ids_of, generate_batch, generate_splitting_on_oom

    eos_token_ids = eos_token_ids_of(model, tokenizer)

    def count_split():
        run_batch.oom_splits += 1

    def run_batch(batch: Batch) -> BatchOutcome:
        generated = generate_splitting_on_oom(
            lambda prompts, lengths: generate_batch(
                model, tokenizer, prompts, batch.max_new_tokens, temperature, lengths, eos_token_ids
            ),
            [prompt_ids[sample_id] for sample_id in batch.ids],
            [replay[sample_id] for sample_id in batch.ids] if replay is not None else None,
            count_split,
            fail_above,
        )
        outcome = BatchOutcome(
            {sample_id: sample.length for sample_id, sample in zip(batch.ids, generated, strict=True)},
            {sample_id: sample.finished for sample_id, sample in zip(batch.ids, generated, strict=True)},
            {sample_id: sample.text for sample_id, sample in zip(batch.ids, generated, strict=True)},
        )
        if debug:
            kind = "recompute" if batch.recompute else "first"
            steps = max(outcome.lengths.values())
            print(f"batch group={batch.group} {kind} size={len(batch.ids)} cap={batch.max_new_tokens} steps={steps}")
        return outcome

    run_batch.oom_splits = 0
    return run_batch


@dataclass(frozen=True)
class Executors:
    """How batches run: `run_batch` for static batches; `run_continuous(order, on_result)` for continuous
    batching on the engine, None in the dry run (the iteration model stands in for it)."""

    run_batch: object
    run_continuous: object = None
    step_costs: object = None  # vbs_auto.StepCosts of the device, for --vbs-table auto
    mean_prompt_length: float = 0.0


def run_strategy(strategy, args, samples, predictor, executors, device, replay=None, show=True) -> dict:
    """Predict, schedule and generate for one strategy; returns its result object. `show` off keeps the
    progress bar and notes of a process that is not the main one off the terminal."""
    from tqdm import tqdm

    set_seed(args.seed)  # sampling runs repeat exactly, whatever ran before
    caps = None
    with Timer(device) as prediction_timer:
        predictions = predictor.predict(samples)
        if args.bucket_predictions:
            predictions = {
                key: clamp_prediction(bucket_of(value), args.max_length) for key, value in predictions.items()
            }
        if strategy.fcr and args.fcr_quantile is not None:
            if not hasattr(predictor, "predict_quantile"):
                raise UserError(f"--fcr-quantile needs a predictor with quantiles (proxy), not {strategy.predictor}")
            caps = predictor.predict_quantile(samples, args.fcr_quantile)
    ids = [sample.id for sample in samples]
    splits_before = getattr(executors.run_batch, "oom_splits", 0)
    with tqdm(total=len(ids), desc=strategy.label, unit="sample", leave=False, disable=not show) as progress:
        if strategy.continuous:
            batches, sample_rows, metrics, seconds, generation_seconds = _run_continuous(
                strategy, args, ids, predictions, executors, device, replay, progress
            )
        else:
            batches, sample_rows, metrics, seconds, generation_seconds = _run_static(
                strategy, args, ids, predictions, executors, device, progress, caps, show
            )
    if not args.dry_run:  # a sample's latency: its finish time since the run (prediction included) began
        for sample_id, value in seconds.items():
            sample_rows[sample_id]["latency_s"] = prediction_timer.seconds + value
    wall = prediction_timer.seconds + generation_seconds
    result = {
        "strategy": strategy.label,
        "predictor": strategy.predictor,
        "vbs": strategy.vbs,
        "fcr": strategy.fcr,
        "continuous": strategy.continuous,
        **metrics,
        "throughput_samples_per_s": len(ids) / wall,
        "wall_time_s": wall,
        "prediction_time_s": prediction_timer.seconds,
        "generation_time_s": generation_seconds,
        "unparsable_predictions": getattr(predictor, "unparsable", 0),
        "oom_splits": getattr(executors.run_batch, "oom_splits", 0) - splits_before,
        "generated_tokens_per_s": metrics["generated_tokens"] / generation_seconds,
        "token_slots_per_s": metrics["token_slots"] / generation_seconds,
        "batch_size": args.batch_size,
        "slots": args.slots if strategy.continuous else None,
        "group_size": args.group_size,
        "max_length": args.max_length,
        "temperature": args.temperature,
        "seed": args.seed,
        "dry_run": args.dry_run,  # times then measure the scheduler alone, not generation
        "processes": 1,
        "batches": batches,
        "fcr_quantile": args.fcr_quantile if caps is not None else None,
        "samples": [
            {"id": sample_id, "prediction": predictions[sample_id]}
            | ({"cap": caps[sample_id]} if caps is not None else {})
            | sample_rows[sample_id]
            for sample_id in ids
        ],
    }
    if not args.dry_run:
        result.update(latency_metrics({row["id"]: row["latency_s"] for row in result["samples"]}, "s"))
    return result


def _run_static(strategy, args, ids, predictions, executors, device, progress, caps=None, show=True):
    config = ScheduleConfig(
        batch_size=args.batch_size,
        group_size=args.group_size,
        max_length=args.max_length,
        sort=strategy.predictor != "vanilla",
        vbs=strategy.vbs,
        fcr=strategy.fcr,
        vbs_table=args.vbs_table_parsed or PAPER_VBS_TABLE,
    )
    if strategy.vbs and args.vbs_table_parsed is None:
        from .vbs_auto import choose_schedule

        config = choose_schedule(ids, predictions, config, executors.step_costs, executors.mean_prompt_length)
        if show and config.vbs:
            chosen = ",".join(f"{bucket}:{size}" for bucket, size in sorted(config.vbs_table.items()))
            print(
                f"vbs auto for {strategy.label}: {chosen} "
                f"(a remainder under max(size // 2, {config.vbs_default_batch_size}) moves up)"
            )
        elif show:
            print(f"vbs auto for {strategy.label}: no table beats plain sorting, batches of {config.batch_size}")

    def advance(_batch, done):
        progress.update(done - progress.n)

    with Timer(device) as generation_timer:
        record = run_schedule(
            ids, predictions, config, executors.run_batch, on_batch=advance, clock=time.perf_counter, caps=caps
        )
    batches = [
        {
            "group": executed.batch.group,
            "recompute": executed.batch.recompute,
            "bucket": executed.batch.bucket,
            "size": len(executed.batch.ids),
            "cap": executed.batch.max_new_tokens,
            "steps": executed.steps,
            "useful_tokens": executed.useful_tokens,
            "elapsed_s": executed.elapsed_s,
        }
        for executed in record.batches
    ]
    final = final_batches(record)
    sample_rows = {
        sample_id: _sample_fields(result) | {"latency_steps": final[sample_id][0]}
        for sample_id, result in record.results.items()
    }
    seconds = {sample_id: executed.elapsed_s for sample_id, (_, executed) in final.items()}
    metrics = compute_metrics(record)
    if config.vbs:
        metrics["vbs_table"] = {str(bucket): size for bucket, size in sorted(config.vbs_table.items())}
        metrics["vbs_default_batch_size"] = config.vbs_default_batch_size
    elif strategy.vbs:  # auto chose plain sorting
        metrics["vbs_table"] = None
        metrics["sorted_batch_size"] = config.batch_size
    return batches, sample_rows, metrics, seconds, generation_timer.seconds


def _run_continuous(strategy, args, ids, predictions, executors, device, replay, progress):
    """Continuous batching: on the engine, or in the dry run on the iteration model. The token columns come
    from the iteration model with the lengths generated (the engine does not report its iterations)."""
    ordered = admission_order(ids, predictions if strategy.predictor != "vanilla" else None, args.group_size)
    with Timer(device) as generation_timer:
        if executors.run_continuous is None:
            record = simulate_continuous(ordered, replay, args.slots, args.max_length)
            progress.update(len(ids))
            seconds = {}
        else:
            outcome = executors.run_continuous(ordered, lambda done: progress.update(done - progress.n))
            modelled = simulate_continuous(ordered, outcome.lengths, args.slots, args.max_length)
            record = ContinuousRecord(ordered, outcome.lengths, outcome.finished, modelled.finish_steps, args.slots)
            seconds = dict(outcome.finish_seconds)
    sample_rows = {
        sample_id: {
            "length": record.lengths[sample_id],
            "finished": record.finished[sample_id],
            "recomputed": False,
            "first_cap": args.max_length,
            "admitted": position,
            "latency_steps": record.finish_steps[sample_id],
        }
        for position, sample_id in enumerate(ordered)
    }
    return [], sample_rows, compute_continuous_metrics(record), seconds, generation_timer.seconds


def _sample_fields(result) -> dict:
    fields = asdict(result)
    del fields["id"], fields["text"]
    return fields


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
    print(f"Average length: {result['average_length']:.2f} tokens")
    print(f"Effective token ratio: {result['effective_token_ratio'] * 100:.2f} %")
    print(f"Failure ratio: {result['failure_ratio'] * 100:.2f} %")
    latency = f"Latency: mean {result['mean_latency_steps']:.0f} steps, p90 {result['p90_latency_steps']:.0f} steps"
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
    from .generate import generate_batch
    from .models import load_model_and_formatter

    model, tokenizer, formatter, model_path = load_model_and_formatter(
        args.model, args.device, args.dtype, args.lora_path, args.load_format, args.conv_template
    )
    device = str(model.device)
    context.model, context.tokenizer, context.formatter = model, tokenizer, formatter
    prompt_ids = {sample.id: formatter.encode(sample.prompt) for sample in samples}
    if processes.is_main:
        print(
            f"model: {model_path} on {device} ({next(model.parameters()).dtype}), template {formatter.template}, "
            f"{len(samples)} samples from {args.data_path}"
            + (f", replaying {args.replay_field}" if replay else "")
            + (f" in process 0 of {processes.count}" if processes.distributed else "")
        )
    if not args.no_warmup:  # the first call pays one-off costs (allocator, kernels) that no strategy should carry
        generate_batch(model, tokenizer, [prompt_ids[samples[0].id]], 2, args.temperature)
    run_batch = make_run_batch(
        model, tokenizer, prompt_ids, args.temperature, replay, args.debug, args.inject_oom_above
    )

    def run_continuous(order, on_result):
        from .continuous import run_continuous as run_on_engine

        return run_on_engine(
            model,
            tokenizer,
            order,
            prompt_ids,
            args.max_length,
            args.slots,
            args.temperature,
            replay,
            on_result,
            args.seed,
        )

    step_costs = None
    mean_prompt_length = sum(len(ids) for ids in prompt_ids.values()) / len(prompt_ids)
    if args.vbs_table_parsed is None and any(strategy.vbs for strategy in args.strategy_list):
        from .vbs_auto import describe, timed_calibration

        # on a CPU the calibration's prefills of more than 64 rows take minutes; larger sizes are extrapolated
        largest = max(CANDIDATE_BATCH_SIZES) if model.device.type == "cuda" else 64
        if processes.is_main:  # one calibration, so that every process plans from the same costs
            step_costs, seconds = timed_calibration(model, device, largest, round(mean_prompt_length) + args.max_length)
        step_costs, seconds = processes.broadcast((step_costs, seconds) if processes.is_main else None)
        args.vbs_calibration = step_costs.to_json() | {"seconds": seconds}
        if processes.is_main:
            print(describe(step_costs, seconds))
    return model_path, device, Executors(run_batch, run_continuous, step_costs, mean_prompt_length)


def share_groups(samples: list, group_size: int, processes: Processes) -> list:
    """This process's samples: whole groups, every K-th one, so each group is scheduled as in one process."""
    groups = -(-len(samples) // group_size)
    if groups < processes.count:
        raise UserError(
            f"{len(samples)} samples make {groups} group(s) of --group-size {group_size}, fewer than the "
            f"{processes.count} processes: use a smaller --group-size or fewer processes"
        )
    return [sample for group in processes.share(samples, group_size) for sample in group]


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

    context = PredictorContext(
        max_length=args.max_length,
        length_path=args.length_path,
        options={
            "prediction_batch_size": args.prediction_batch_size,
            "constant_length": args.constant_length,
            "gt_field": args.gt_field,
            "predictor_path": args.predictor_path,
            "predictor_device": resolve_device(args.device),
        },
    )
    predictors = {}
    for strategy in args.strategy_list:  # predictors without a model fail fast, before the model loads
        if args.dry_run and PREDICTORS[strategy.predictor].needs_model:
            raise UserError(f"strategy {strategy.predictor} needs a model and cannot run with --dry-run")
        if strategy.predictor not in predictors and not PREDICTORS[strategy.predictor].needs_model:
            predictors[strategy.predictor] = build_predictor(strategy.predictor, context)
            if PREDICTORS[strategy.predictor].uses_length_file:
                predictors[strategy.predictor].predict(all_samples)  # checks every id has a row

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
    output["args"]["device_resolved"] = device
    output["args"]["device_name"] = None if args.dry_run else describe_device(device)
    output["args"]["versions"] = library_versions()
    output["args"]["processes"] = processes.count
    for strategy in args.strategy_list:
        processes.wait()  # the processes start each strategy together, so the slowest one's time is the run's
        result = run_strategy(
            strategy, args, samples, predictors[strategy.predictor], executors, device, replay, processes.is_main
        )
        result = merge_process_results(processes.gather(result), all_ids)
        if not processes.is_main:
            continue
        print_result(result)
        output["results"].append(result)
        if args.output_json:  # after each strategy, so finished results survive a later failure
            write_json_atomic(args.output_json, output)
    if len(output["results"]) > 1:
        print_table(output["results"])
    return output


if __name__ == "__main__":
    run_cli(main)
