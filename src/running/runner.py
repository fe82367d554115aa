"""One strategy's run, from predictions to a result: static batches through the scheduler (src.scheduling) and an
injected batch executor, or continuous batching through the engine's queue (or its iteration model in a dry run).

    predictions -> schedule config (VBS auto chooses its table here) -> run_schedule(executor) -> result dict
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import NamedTuple

from ..common.utils import Timer, set_seed
from ..engines.base import Engine
from ..scheduling.batches import PAPER_VBS_TABLE, Batch, ScheduleConfig, bucket_of, clamp_prediction
from ..scheduling.continuous import (
    ContinuousRecord,
    admission_order,
    simulate_continuous,
    simulate_continuous_arrivals,
)
from ..scheduling.metrics import (
    StrategyResult,
    compute_continuous_metrics,
    compute_metrics,
    continuous_latency_steps,
    latency_metrics,
)
from ..scheduling.schedule import RunBatch, final_batches, run_schedule
from ..scheduling.strategy import Strategy
from .cost_estimate import estimate_fields
from .settings import RunSettings, require_quantiles


@dataclass(frozen=True)
class Executors:
    """How batches run: `run_batch` for static batches (a StaticBatchExecutor, or the dry run's replay); and
    `run_continuous(order, slots, on_result)` for continuous batching on the engine, None in the dry run (the
    iteration model stands in for it)."""

    run_batch: RunBatch
    run_continuous: object = None
    engine: Engine | None = None  # None in the dry run; its warm-up (compiling new shapes) stops the run's clock
    step_costs: object = None  # vbs_choice.StepCosts of the device, for --vbs-table auto
    mean_prompt_length: float = 0.0
    calibration: dict | None = None  # the step costs and the calibration's seconds, as the JSON records them
    prompt_lengths: dict | None = None  # id -> prompt tokens; None in the dry run, which has no prompts
    device_costs: object = None  # cost_model.DeviceCosts of --device-profile; None: no estimate of seconds
    cost_prompt_tokens: dict | None = None  # id -> prompt tokens the estimate counts (the dry run's approximated)

    def warmup_seconds(self) -> float:
        """The engine's one-off costs so far (compiling and recording new shapes): kept out of every throughput."""
        return self.engine.warmup_seconds if self.engine is not None else 0.0


class SchedulePredictions(NamedTuple):
    """What a strategy schedules from: each sample's predicted length, its FCR cap where an upper quantile sets it
    (None: the batch's largest prediction), and the caps of +resume's retries, one map per quantile level."""

    lengths: dict[str, int]
    caps: dict[str, int] | None
    retry_caps: list[dict[str, int]]
    retry_levels: list[float]


def predict_for_schedule(
    strategy: Strategy,
    predictor,
    samples: list,
    max_length: int,
    bucket_predictions: bool = False,
    fcr_quantile: float | None = None,
    retry_levels: list[float] = (),
) -> SchedulePredictions:
    """The predictor's lengths for `samples` and the caps the strategy takes from its quantiles, each within [1,
    max_length]. `bucket_predictions` rounds each prediction up to its 50-token bucket, the form of the paper's seqsch
    answers."""

    def clamped(values: dict) -> dict[str, int]:
        return {key: clamp_prediction(value, max_length) for key, value in values.items()}

    predictions = clamped(predictor.predict(samples))
    if bucket_predictions:
        predictions = clamped({key: bucket_of(value) for key, value in predictions.items()})
    caps = None
    if strategy.fcr and fcr_quantile is not None:
        require_quantiles(strategy)
        caps = clamped(predictor.predict_quantile(samples, fcr_quantile))
    retry_caps = [clamped(predictor.predict_quantile(samples, level)) for level in retry_levels]
    return SchedulePredictions(predictions, caps, retry_caps, list(retry_levels))


def schedule_config(strategy: Strategy, batch_size: int, group_size: int, max_length: int, vbs_table) -> ScheduleConfig:
    """The scheduler's settings for a static strategy; `vbs_table` None (auto) starts from the paper's, which
    src.scheduling.vbs_choice then replaces."""
    return ScheduleConfig(
        batch_size=batch_size,
        group_size=group_size,
        max_length=max_length,
        sort=strategy.predictor != "vanilla",
        vbs=strategy.vbs,
        fcr=strategy.fcr,
        resume=strategy.resume,
        vbs_table=vbs_table or PAPER_VBS_TABLE,
    )


class RunParts(NamedTuple):
    """What the static and the continuous runs give back to `run_strategy`."""

    batches: list[dict]
    sample_rows: dict[str, dict]
    metrics: dict
    finish_seconds: dict[str, float]  # id -> seconds since generation began, when it finished; {} in a dry run
    generation_seconds: float
    oom_splits: int = 0  # halvings that out-of-memory errors forced


def run_strategy(
    strategy: Strategy,
    settings: RunSettings,
    samples: list,
    predictor,
    executors: Executors,
    device: str,
    replay=None,
    show: bool = True,
    slots: int | None = None,
    on_result=None,
) -> StrategyResult:
    """Predict, schedule and generate for one strategy; returns its result object. `show` off keeps the
    progress bar and notes of a process that is not the main one off the terminal. `slots`: continuous batching's
    slot budget (default settings.slots). `on_result(result, batch)`: told each static sample's final result
    (run_schedule)."""
    from tqdm import tqdm

    slots = settings.slots if slots is None else slots
    set_seed(settings.seed)  # sampling runs repeat exactly, whatever ran before
    with Timer(device) as prediction_timer:
        predicted = predict_for_schedule(
            strategy,
            predictor,
            samples,
            settings.max_length,
            settings.bucket_predictions,
            settings.fcr_quantile,
            settings.retry_levels_of(strategy),
        )
    ids = [sample.id for sample in samples]
    with tqdm(total=len(ids), desc=strategy.label, unit="sample", leave=False, disable=not show) as progress:
        if strategy.continuous:
            run = _run_continuous(
                strategy, settings, ids, predicted.lengths, executors, device, replay, progress, slots
            )
        else:
            run = _run_static(strategy, settings, ids, predicted, executors, device, progress, show, on_result)
    return _result(strategy, settings, ids, predictor, predicted, run, prediction_timer.seconds, slots)


def _result(strategy, settings, ids, predictor, predicted, run: RunParts, prediction_seconds, slots) -> dict:
    if not settings.dry_run:  # a sample's latency: its finish time since the run (prediction included) began
        for sample_id, value in run.finish_seconds.items():
            run.sample_rows[sample_id]["latency_s"] = prediction_seconds + value
    wall = prediction_seconds + run.generation_seconds
    result = {
        "strategy": strategy.label,
        "predictor": strategy.predictor,
        "vbs": strategy.vbs,
        "fcr": strategy.fcr,
        "resume": strategy.resume,
        "continuous": strategy.continuous,
        **run.metrics,
        "throughput_samples_per_s": len(ids) / wall,
        "wall_time_s": wall,
        "prediction_time_s": prediction_seconds,
        "generation_time_s": run.generation_seconds,
        "unparsable_predictions": predictor.unparsable,
        "oom_splits": run.oom_splits,
        "generated_tokens_per_s": run.metrics["generated_tokens"] / run.generation_seconds,
        "token_slots_per_s": run.metrics["token_slots"] / run.generation_seconds,
        "batch_size": settings.batch_size,
        "slots": slots if strategy.continuous else None,
        "group_size": settings.group_size,
        "max_length": settings.max_length,
        "temperature": settings.temperature,
        "seed": settings.seed,
        "dry_run": settings.dry_run,  # times then measure the scheduler alone, not generation
        "processes": 1,
        "batches": run.batches,
        "fcr_quantile": settings.fcr_quantile if predicted.caps is not None else None,
        "fcr_retry_quantiles": list(predicted.retry_levels),
        "samples": [
            {"id": sample_id, "prediction": predicted.lengths[sample_id]}
            | ({"cap": predicted.caps[sample_id]} if predicted.caps is not None else {})
            | run.sample_rows[sample_id]
            for sample_id in ids
        ],
    }
    if not settings.dry_run:
        result.update(latency_metrics({row["id"]: row["latency_s"] for row in result["samples"]}, "s"))
    return result


def _static_config(strategy, settings, ids, predictions, executors, show) -> ScheduleConfig:
    """The strategy's schedule config; under VBS auto, the table chosen for these predictions on this device."""
    config = schedule_config(
        strategy, settings.batch_size, settings.group_size, settings.max_length, settings.vbs_table
    )
    if not strategy.vbs or settings.vbs_table is not None:
        return config
    from ..scheduling.vbs_choice import choose_schedule

    config = choose_schedule(ids, predictions, config, executors.step_costs, executors.mean_prompt_length)
    if show and config.vbs:
        chosen = ",".join(f"{bucket}:{size}" for bucket, size in sorted(config.vbs_table.items()))
        print(
            f"vbs auto for {strategy.label}: {chosen} "
            f"(a remainder under max(size // 2, {config.vbs_default_batch_size}) moves up)"
        )
    elif show:
        print(f"vbs auto for {strategy.label}: no table beats plain sorting, batches of {config.batch_size}")
    return config


def _run_static(strategy, settings, ids, predicted, executors, device, progress, show, on_result) -> RunParts:
    config = _static_config(strategy, settings, ids, predicted.lengths, executors, show)
    warmup_before = executors.warmup_seconds()

    def clock() -> float:  # the run's clock stops while the engine compiles a new shape
        return time.perf_counter() - executors.warmup_seconds()

    with Timer(device) as generation_timer:
        record = run_schedule(
            ids,
            predicted.lengths,
            config,
            executors.run_batch,
            lambda _batch, done: progress.update(done - progress.n),
            clock,
            caps=predicted.caps,
            retry_caps=predicted.retry_caps,
            on_result=on_result,
        )
    warmup = executors.warmup_seconds() - warmup_before
    final = final_batches(record)
    sample_rows = {
        sample_id: _sample_fields(result) | {"latency_steps": final[sample_id][0]}
        for sample_id, result in record.results.items()
    }
    metrics = compute_metrics(record)
    if config.vbs:
        metrics["vbs_table"] = {str(bucket): size for bucket, size in sorted(config.vbs_table.items())}
        metrics["vbs_default_batch_size"] = config.vbs_default_batch_size
    elif strategy.vbs:  # auto chose plain sorting
        metrics["vbs_table"] = None
        metrics["sorted_batch_size"] = config.batch_size
    metrics["engine_warmup_s"] = warmup
    metrics |= estimate_fields(executors.device_costs, executors.cost_prompt_tokens, record)
    return RunParts(
        [_batch_row(executed, executors.prompt_lengths) for executed in record.batches],
        sample_rows,
        metrics,
        {sample_id: executed.elapsed_s for sample_id, (_, executed) in final.items()},
        generation_timer.seconds - warmup,
        sum(executed.oom_splits for executed in record.batches),
    )


def _batch_row(executed, prompt_lengths: dict | None) -> dict:
    batch = executed.batch
    return {
        "group": batch.group,
        "recompute": batch.recompute,
        "attempt": batch.attempt,
        # generated earlier, continued here (prefilled again unless their KV cache was kept: kv_reused_tokens)
        "resumed_tokens": sum(batch.resume_from or ()),
        "bucket": batch.bucket,
        "size": len(batch.ids),
        "cap": batch.max_new_tokens,
        "steps": executed.steps,
        "token_slots": executed.token_slots,  # steps x size, unless an out-of-memory split ran it in pieces
        "useful_tokens": executed.useful_tokens,
        "elapsed_s": executed.elapsed_s,
        "cache_tokens": cache_tokens(batch, prompt_lengths),
    } | dict(executed.executor_fields)


def _run_continuous(strategy, settings, ids, predictions, executors, device, replay, progress, slots) -> RunParts:
    """Continuous batching: on the engine, or in the dry run on the iteration model. The token columns come
    from the iteration model with the lengths generated (the engine does not report its iterations)."""
    ordered = admission_order(ids, predictions if strategy.predictor != "vanilla" else None, settings.group_size)
    warmup, seconds, engine_settings = 0.0, {}, None
    with Timer(device) as generation_timer:
        if executors.run_continuous is None and settings.arrival_rate:
            # requests arrive in data order, one every 1 / rate steps; the predictor orders the waiting ones
            arrivals = {sample_id: index / settings.arrival_rate for index, sample_id in enumerate(ids)}
            priorities = predictions if strategy.predictor != "vanilla" else None
            record = simulate_continuous_arrivals(
                arrivals, replay, slots, settings.max_length, priorities, settings.aging
            )
            ordered = record.order
            progress.update(len(ids))
        elif executors.run_continuous is None:
            record = simulate_continuous(ordered, replay, slots, settings.max_length)
            progress.update(len(ids))
        else:
            outcome = executors.run_continuous(ordered, slots, lambda told: progress.update(told.done - progress.n))
            modelled = simulate_continuous(ordered, outcome.lengths, slots, settings.max_length)
            record = ContinuousRecord(ordered, outcome.lengths, outcome.finished, modelled.finish_steps, slots)
            seconds = dict(outcome.finish_seconds)
            warmup, engine_settings = outcome.warmup_s, outcome.settings
    latency_steps = continuous_latency_steps(record)
    sample_rows = {
        sample_id: {
            "length": record.lengths[sample_id],
            "finished": record.finished[sample_id],
            "recomputed": False,
            "first_cap": settings.max_length,
            "admitted": position,
            "latency_steps": latency_steps[sample_id],
        }
        for position, sample_id in enumerate(ordered)
    }
    metrics = compute_continuous_metrics(record) | {"engine_warmup_s": warmup, "continuous_settings": engine_settings}
    metrics |= estimate_fields(executors.device_costs, executors.cost_prompt_tokens, record)
    return RunParts([], sample_rows, metrics, seconds, generation_timer.seconds - warmup)


def cache_tokens(batch: Batch, prompt_lengths: dict | None) -> int:
    """KV-cache tokens a static batch holds at once: rows x (longest prompt, with the tokens a resumed member
    continues from, + cap); the dry run knows no prompts and counts the generated tokens only."""
    progress = batch.resume_from or (0,) * len(batch.ids)
    longest_prompt = max(
        (prompt_lengths or {}).get(sample_id, 0) + done for sample_id, done in zip(batch.ids, progress, strict=True)
    )
    return len(batch.ids) * (longest_prompt + batch.max_new_tokens)


def _sample_fields(result) -> dict:
    fields = asdict(result)
    del fields["id"], fields["text"]
    return fields
