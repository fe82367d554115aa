"""Strategies: the grammar of `--strategies` (`gt+vbs+fcr`, `continuous:proxy`) and how one strategy runs, from
predictions to a result: static batches through the scheduler (src.scheduling.schedule) and an injected batch
executor, or continuous batching through the engine's queue (or its iteration model in a dry run).

Adding a strategy modifier means a field of `Strategy`, its parsing here, and its use in `_run_static`; adding a
predictor needs nothing here (src.predictors.registry' registry).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import NamedTuple

from ..common.distributed import Processes
from ..common.utils import Timer, UserError, set_seed
from ..predictors.registry import PREDICTORS
from ..scheduling.metrics import (
    StrategyResult,
    compute_continuous_metrics,
    compute_metrics,
    continuous_latency_steps,
    latency_metrics,
)
from ..scheduling.schedule import (
    PAPER_VBS_TABLE,
    Batch,
    BatchOutcome,
    ContinuousRecord,
    ScheduleConfig,
    admission_order,
    bucket_of,
    clamp_prediction,
    final_batches,
    run_schedule,
    simulate_continuous,
    simulate_continuous_arrivals,
)

STRATEGY_MODIFIERS = ("vbs", "fcr", "resume")
# +resume retries its failures at these upper quantiles of their predicted lengths, one retry each, before the
# last retry at max_length; chosen on 1000 held-out train rows (docs/RESUME.md)
RESUME_RETRY_QUANTILES = (0.8, 0.95)
CONTINUOUS = "continuous"
AUTO_SLOTS = "auto"
# The share of the free memory (host RAM on a CPU) that +resume's kept KV caches may take; a failure past it is
# prefilled again when it resumes
KV_CACHE_BUDGET = 0.25
# A real batch row's clock readings (they differ from run to run; every other column is the schedule's)
BATCH_TIMING_FIELDS = (
    "elapsed_s",
    "prefill_s",
    "decode_s",
    "other_s",
    "warmup_s",
    "decode_steps_timed",
    "decode_ms_per_step",
    "first_steps_ms",
    "last_steps_ms",
)
# A real batch row's columns from the executor besides the clock: the prompt tokens whose KV cache it reused
BATCH_ENGINE_FIELDS = ("kv_reused_tokens",)


@dataclass(frozen=True)
class Strategy:
    predictor: str
    vbs: bool = False
    fcr: bool = False
    continuous: bool = False  # iteration-level batching; with predictor vanilla, admission in data order
    resume: bool = False  # FCR failures continue from their tokens instead of starting over

    @property
    def label(self) -> str:
        if self.continuous:
            return CONTINUOUS if self.predictor == "vanilla" else f"{CONTINUOUS}:{self.predictor}"
        return "+".join([self.predictor] + [name for name in STRATEGY_MODIFIERS if getattr(self, name)])


def parse_strategy(text: str, vbs: bool = False, fcr: bool = False) -> Strategy:
    """`gt+vbs+fcr` -> Strategy('gt', True, True); --vbs/--fcr add to every strategy but vanilla,
    which is the unscheduled baseline by definition. `+resume` (with FCR) lets failures continue from the tokens
    they made. `continuous` is continuous batching in data order (FCFS), `continuous:gt` admits shortest predicted
    first (any predictor); VBS and FCR do not apply to it."""
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
        raise UserError(f"unknown strategy modifier {unknown[0]!r} in {text!r}: use +vbs, +fcr and/or +resume")
    if name == "vanilla":
        return Strategy("vanilla")
    fcr = fcr or "fcr" in modifiers
    if "resume" in modifiers and not fcr:
        raise UserError(f"{text!r}: +resume continues FCR's failures, so it needs +fcr (e.g. {name}+fcr+resume)")
    return Strategy(name, vbs or "vbs" in modifiers, fcr, resume="resume" in modifiers)


class StaticBatchExecutor:
    """The executor of static batches: one scheduled batch through the engine, split in halves on out-of-memory
    errors, counted in `oom_splits`. It keeps the tokens of every sample that stopped unfinished, so that a batch
    that resumes samples (`Batch.resume_from`) feeds each its prompt followed by them; and, where the engine can
    (`keeps_kv_caches`) and the scheduler will resume them (`Batch.resume_below`), their KV caches too, within
    KV_CACHE_BUDGET of the free memory, so that a resumed batch whose every member has its cache skips the
    prefill."""

    def __init__(self, engine, prompt_ids, temperature, replay, debug=False, fail_above=None):
        self.engine, self.prompt_ids, self.temperature, self.replay = engine, prompt_ids, temperature, replay
        self.debug, self.fail_above = debug, fail_above
        self.top_p = 1.0  # the nucleus of sampling (temperature above 0); 1 samples from the whole distribution
        self.oom_splits = 0
        self.timings: list[dict] = []  # one per executed batch, in order: where its time went (engine's BatchTiming)
        self.unfinished_tokens: dict[str, list[int]] = {}  # id -> every token of its latest unfinished attempt
        self.kv_caches: dict[str, tuple] = {}  # id -> the KV cache of that attempt (engine.generate's kv_cache)
        self.kv_cache_bytes = 0
        self.kv_budget_bytes: int | None = None  # set at the first batch that keeps caches
        self.engine_keeps_kv_caches = engine_keeps_kv_caches(engine)

    def count_split(self) -> None:
        self.oom_splits += 1

    def _kept_tokens(self, batch: Batch) -> list[list[int]]:
        """The tokens each member continues from ([] for one that starts afresh)."""
        kept = []
        for sample_id, done in zip(batch.ids, batch.resume_from or (0,) * len(batch.ids), strict=True):
            tokens = self.unfinished_tokens.get(sample_id, []) if done else []
            if len(tokens) != done:
                raise RuntimeError(
                    f"id {sample_id} resumes from {done} tokens, but its last attempt kept {len(tokens)}"
                )
            kept.append(tokens)
        return kept

    def _take_kv_caches(self, batch: Batch, prompts: list[list[int]]) -> list[tuple] | None:
        """The members' kept caches when every one has a cache over its prompt and tokens (all but the last), else
        None (the batch is prefilled); either way the batch takes them over."""
        caches = [self._drop_kv_cache(sample_id) for sample_id in batch.ids]
        if not batch.resume_from or any(
            cache is None or cache[0][0].shape[2] != len(prompt) - 1
            for cache, prompt in zip(caches, prompts, strict=True)
        ):
            return None
        return caches

    def _drop_kv_cache(self, sample_id: str):
        from ..engines.generate import kv_cache_bytes

        cache = self.kv_caches.pop(sample_id, None)
        if cache is not None:
            self.kv_cache_bytes -= kv_cache_bytes(cache)
        return cache

    def _keep_kv_cache(self, sample_id: str, cache) -> None:
        from ..common.utils import free_memory_bytes
        from ..engines.generate import kv_cache_bytes

        if self.kv_budget_bytes is None:
            self.kv_budget_bytes = int(KV_CACHE_BUDGET * (free_memory_bytes(self.engine.device) or 0))
        size = kv_cache_bytes(cache)
        if self.kv_cache_bytes + size <= self.kv_budget_bytes:
            self.kv_caches[sample_id] = cache
            self.kv_cache_bytes += size

    def __call__(self, batch: Batch) -> BatchOutcome:
        from ..engines.generate import generate_splitting_on_oom

        run_sizes = []  # the rows of each generate call that completed, in order
        timings = []
        with_caches = self.engine_keeps_kv_caches
        keep_caches = with_caches and batch.resume_below is not None

        def generate(prompts, lengths, prefix_caches):
            warmup_before = self.engine.warmup_seconds
            extras = {}  # only what is used, so that an engine without these arguments runs every other batch
            if prefix_caches is not None:
                extras["prefix_caches"] = prefix_caches
            if keep_caches:
                extras["keep_caches"] = True
            if self.top_p < 1.0 and self.temperature > 0:
                extras["top_p"] = self.top_p
            samples = self.engine.generate(prompts, batch.max_new_tokens, self.temperature, lengths, **extras)
            run_sizes.append(len(prompts))
            if self.engine.last_timing is not None:
                timings.append((self.engine.last_timing, self.engine.warmup_seconds - warmup_before))
            return samples

        kept = self._kept_tokens(batch)
        prompts = [self.prompt_ids[sample_id] + tokens for sample_id, tokens in zip(batch.ids, kept, strict=True)]
        prefix_caches = self._take_kv_caches(batch, prompts) if with_caches else None
        generated = generate_splitting_on_oom(
            generate,
            prompts,
            [max(1, self.replay[sample_id] - len(tokens)) for sample_id, tokens in zip(batch.ids, kept, strict=True)]
            if self.replay is not None
            else None,
            self.count_split,
            self.fail_above,
            prefix_caches,
        )
        parts, start = [], 0
        for size in run_sizes:
            parts.append(batch.ids[start : start + size])
            start += size
        texts = {}
        for sample_id, tokens, sample in zip(batch.ids, kept, generated, strict=True):
            all_tokens = tokens + sample.token_ids
            if batch.length_limit is not None and len(all_tokens) > batch.length_limit:
                all_tokens = all_tokens[: batch.length_limit]  # cut at max_length, as the scheduler counts it
            texts[sample_id] = (
                self.engine.tokenizer.decode(all_tokens, skip_special_tokens=True) if tokens else sample.text
            )
            self._drop_kv_cache(sample_id)
            if sample.finished:
                self.unfinished_tokens.pop(sample_id, None)
            else:
                self.unfinished_tokens[sample_id] = all_tokens
                if keep_caches and sample.kv_cache is not None and len(all_tokens) < batch.resume_below:
                    self._keep_kv_cache(sample_id, sample.kv_cache)
        outcome = BatchOutcome(
            {sample_id: sample.length for sample_id, sample in zip(batch.ids, generated, strict=True)},
            {sample_id: sample.finished for sample_id, sample in zip(batch.ids, generated, strict=True)},
            texts,
            tuple(parts) if len(parts) > 1 else None,
        )
        reused = sum(len(prompt) - 1 for prompt in prompts) if prefix_caches is not None else 0
        self.timings.append(batch_timing_fields(timings) | {"kv_reused_tokens": reused})
        if self.debug:
            kind = f"retry {batch.attempt}" if batch.recompute else "first"
            steps = max(outcome.lengths.values())
            print(f"batch group={batch.group} {kind} size={len(batch.ids)} cap={batch.max_new_tokens} steps={steps}")
        return outcome


def engine_keeps_kv_caches(engine) -> bool:
    """Whether the engine's `generate` takes and returns rows' KV caches (an engine that subclasses one that does but
    overrides `generate` without the arguments does not)."""
    import inspect

    if not getattr(engine, "keeps_kv_caches", False):
        return False
    return {"prefix_caches", "keep_caches"} <= set(inspect.signature(engine.generate).parameters)


def batch_timing_fields(timings: list) -> dict:
    """A batch row's timing columns, summed over the pieces an out-of-memory split ran: the engine's prefill, decode
    and other seconds, its decode steps and their mean cost (ms), the mean step of the first and the last tenth of
    the steps (how a step grows with the context), and the warm-up (compilation) the batch's first shape paid."""
    if not timings:
        return {}
    prefill = sum(timing.prefill_s for timing, _ in timings)
    decode = sum(timing.decode_s for timing, _ in timings)
    steps = sum(timing.decode_steps for timing, _ in timings)
    warmup = sum(seconds for _, seconds in timings)
    return {
        "prefill_s": prefill,
        "decode_s": decode,
        "other_s": sum(timing.wall_s for timing, _ in timings) - prefill - decode,
        "warmup_s": warmup,
        "decode_steps_timed": steps,
        "decode_ms_per_step": 1000 * decode / steps if steps else None,
        "first_steps_ms": timings[0][0].first_steps_ms,
        "last_steps_ms": timings[-1][0].last_steps_ms,
    }


def require_quantiles(strategy: Strategy, option: str = "--fcr-quantile") -> None:
    """`--fcr-quantile` and `--fcr-retry-quantiles` cap FCR batches at upper quantiles, which only predictors with
    quantiles give."""
    if strategy.fcr and not hasattr(PREDICTORS[strategy.predictor], "predict_quantile"):
        raise UserError(f"{option} needs a predictor with quantiles (proxy), not {strategy.predictor}")


def resume_retry_levels(strategy: Strategy, requested: list[float] | None, available=None) -> list[float]:
    """The quantile levels of a strategy's capped FCR retries (before the last, at max_length): +resume strategies
    only, whose failures lose nothing by stopping again; `requested` (--fcr-retry-quantiles, [] for none) or, by
    default, those of RESUME_RETRY_QUANTILES that the predictor has (`available`: its levels, when known)."""
    if not strategy.resume:
        return []
    if requested is None:
        if not hasattr(PREDICTORS[strategy.predictor], "predict_quantile"):
            return []
        return [level for level in RESUME_RETRY_QUANTILES if available is None or level in available]
    if requested:
        require_quantiles(strategy, "--fcr-retry-quantiles")
    return list(requested)


@dataclass(frozen=True)
class Executors:
    """How batches run: `run_batch` for static batches (a StaticBatchExecutor, or the dry run's replay); and
    `run_continuous(order, on_result)` for continuous batching on the engine, None in the dry run (the iteration
    model stands in for it)."""

    run_batch: object
    run_continuous: object = None
    step_costs: object = None  # vbs_auto.StepCosts of the device, for --vbs-table auto
    mean_prompt_length: float = 0.0
    calibration: dict | None = None  # the step costs and the calibration's seconds, as the JSON records them
    prompt_lengths: dict | None = None  # id -> prompt tokens; None in the dry run, which has no prompts


def equal_memory_slots(results: list, longest_prompt: int, max_length: int, batch_size: int) -> int:
    """`--slots auto`: the continuous-batching slots that the KV-cache memory of the largest static batch among
    `results` holds. A static batch holds rows x (its longest prompt + its cap) cache tokens; a slot reserves room for
    the longest request, longest prompt + max_length (src.engines.continuous sizes the cache so). The dry run
    knows no prompts and counts generated tokens only. Without a static result: --batch-size slots, the static default's memory."""
    largest = max(
        (row["cache_tokens"] for result in results if not result["continuous"] for row in result["batches"]),
        default=0,
    )
    if not largest:
        return batch_size
    return max(1, largest // (longest_prompt + max_length))


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
    retry_quantiles: list[float] | None = None,
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
    levels = resume_retry_levels(strategy, retry_quantiles, getattr(predictor, "quantile_levels", None))
    retry_caps = [clamped(predictor.predict_quantile(samples, level)) for level in levels]
    return SchedulePredictions(predictions, caps, retry_caps, levels)


def schedule_config(
    strategy: Strategy, batch_size: int, group_size: int, max_length: int, vbs_table=None
) -> ScheduleConfig:
    """The scheduler's settings for a static strategy; `vbs_table` None: the paper's."""
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


def run_strategy(
    strategy, args, samples, predictor, executors, device, replay=None, show=True, slots=None, on_result=None
) -> StrategyResult:
    """Predict, schedule and generate for one strategy; returns its result object. `show` off keeps the
    progress bar and notes of a process that is not the main one off the terminal. `slots`: continuous batching's
    slot budget (default --slots). `on_result(result, batch)`: told each static sample's final result (run_schedule)."""
    slots = args.slots if slots is None else slots
    from tqdm import tqdm

    set_seed(args.seed)  # sampling runs repeat exactly, whatever ran before
    with Timer(device) as prediction_timer:
        predicted = predict_for_schedule(
            strategy,
            predictor,
            samples,
            args.max_length,
            args.bucket_predictions,
            args.fcr_quantile,
            getattr(args, "fcr_retry_quantiles", None),
        )
    predictions, caps, retry_caps, retry_levels = predicted
    ids = [sample.id for sample in samples]
    splits_before = getattr(executors.run_batch, "oom_splits", 0)
    with tqdm(total=len(ids), desc=strategy.label, unit="sample", leave=False, disable=not show) as progress:
        if strategy.continuous:
            batches, sample_rows, metrics, seconds, generation_seconds = _run_continuous(
                strategy, args, ids, predictions, executors, device, replay, progress, slots
            )
        else:
            batches, sample_rows, metrics, seconds, generation_seconds = _run_static(
                strategy, args, ids, predictions, executors, device, progress, caps, show, retry_caps, on_result
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
        "resume": strategy.resume,
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
        "slots": slots if strategy.continuous else None,
        "group_size": args.group_size,
        "max_length": args.max_length,
        "temperature": args.temperature,
        "seed": args.seed,
        "dry_run": args.dry_run,  # times then measure the scheduler alone, not generation
        "processes": 1,
        "batches": batches,
        "fcr_quantile": args.fcr_quantile if caps is not None else None,
        "fcr_retry_quantiles": list(retry_levels),
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


def _run_static(
    strategy, args, ids, predictions, executors, device, progress, caps=None, show=True, retry_caps=(), on_result=None
):
    config = schedule_config(strategy, args.batch_size, args.group_size, args.max_length, args.vbs_table_parsed)
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

    prompt_lengths = executors.prompt_lengths
    engine = getattr(executors.run_batch, "engine", None)
    timings = getattr(executors.run_batch, "timings", None)
    timings_before = len(timings) if timings is not None else 0
    warmup_before = engine_warmup_seconds(engine)

    def clock() -> float:  # the run's clock stops while the engine compiles a new shape
        return time.perf_counter() - engine_warmup_seconds(engine)

    with Timer(device) as generation_timer:
        record = run_schedule(
            ids,
            predictions,
            config,
            executors.run_batch,
            advance,
            clock,
            caps=caps,
            retry_caps=retry_caps,
            on_result=on_result,
        )
    warmup = engine_warmup_seconds(engine) - warmup_before
    batch_timings = timings[timings_before:] if timings is not None else []
    if len(batch_timings) != len(record.batches):
        batch_timings = [{}] * len(record.batches)
    batches = [
        {
            "group": executed.batch.group,
            "recompute": executed.batch.recompute,
            "attempt": executed.batch.attempt,
            # generated earlier, continued here (prefilled again unless their KV cache was kept: kv_reused_tokens)
            "resumed_tokens": sum(executed.batch.resume_from or ()),
            "bucket": executed.batch.bucket,
            "size": len(executed.batch.ids),
            "cap": executed.batch.max_new_tokens,
            "steps": executed.steps,
            "token_slots": executed.token_slots,  # steps x size, unless an out-of-memory split ran it in pieces
            "useful_tokens": executed.useful_tokens,
            "elapsed_s": executed.elapsed_s,
            "cache_tokens": cache_tokens(executed.batch, prompt_lengths),
        }
        | timing
        for executed, timing in zip(record.batches, batch_timings, strict=True)
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
    metrics["engine_warmup_s"] = warmup
    return batches, sample_rows, metrics, seconds, generation_timer.seconds - warmup


def _run_continuous(strategy, args, ids, predictions, executors, device, replay, progress, slots):
    """Continuous batching: on the engine, or in the dry run on the iteration model. The token columns come
    from the iteration model with the lengths generated (the engine does not report its iterations)."""
    ordered = admission_order(ids, predictions if strategy.predictor != "vanilla" else None, args.group_size)
    warmup = 0.0
    arrival_rate = getattr(args, "arrival_rate", None)
    with Timer(device) as generation_timer:
        if executors.run_continuous is None and arrival_rate:
            # requests arrive in data order, one every 1 / rate steps; the predictor orders the waiting ones
            arrivals = {sample_id: index / arrival_rate for index, sample_id in enumerate(ids)}
            priorities = predictions if strategy.predictor != "vanilla" else None
            record = simulate_continuous_arrivals(arrivals, replay, slots, args.max_length, priorities, args.aging)
            ordered = record.order
            progress.update(len(ids))
            seconds = {}
        elif executors.run_continuous is None:
            record = simulate_continuous(ordered, replay, slots, args.max_length)
            progress.update(len(ids))
            seconds = {}
        else:
            outcome = executors.run_continuous(ordered, slots, lambda done: progress.update(done - progress.n))
            modelled = simulate_continuous(ordered, outcome.lengths, slots, args.max_length)
            record = ContinuousRecord(ordered, outcome.lengths, outcome.finished, modelled.finish_steps, slots)
            seconds = dict(outcome.finish_seconds)
            warmup = outcome.warmup_s
    latency_steps = continuous_latency_steps(record)
    sample_rows = {
        sample_id: {
            "length": record.lengths[sample_id],
            "finished": record.finished[sample_id],
            "recomputed": False,
            "first_cap": args.max_length,
            "admitted": position,
            "latency_steps": latency_steps[sample_id],
        }
        for position, sample_id in enumerate(ordered)
    }
    metrics = compute_continuous_metrics(record) | {"engine_warmup_s": warmup}
    return [], sample_rows, metrics, seconds, generation_timer.seconds - warmup


def cache_tokens(batch: Batch, prompt_lengths: dict | None) -> int:
    """KV-cache tokens a static batch holds at once: rows x (longest prompt, with the tokens a resumed member
    continues from, + cap); the dry run knows no prompts and counts the generated tokens only."""
    progress = batch.resume_from or (0,) * len(batch.ids)
    longest_prompt = max(
        (prompt_lengths or {}).get(sample_id, 0) + done for sample_id, done in zip(batch.ids, progress, strict=True)
    )
    return len(batch.ids) * (longest_prompt + batch.max_new_tokens)


def engine_warmup_seconds(engine) -> float:
    """The engine's one-off costs so far (compiling and recording new shapes): kept out of every throughput."""
    return getattr(engine, "warmup_seconds", 0.0) if engine is not None else 0.0


def _sample_fields(result) -> dict:
    fields = asdict(result)
    del fields["id"], fields["text"]
    return fields


def share_groups(samples: list, group_size: int, processes: Processes) -> list:
    """This process's samples: whole groups, every K-th one, so each group is scheduled as in one process."""
    groups = -(-len(samples) // group_size)
    if groups < processes.count:
        raise UserError(
            f"{len(samples)} samples make {groups} group(s) of --group-size {group_size}, fewer than the "
            f"{processes.count} processes: use a smaller --group-size or fewer processes"
        )
    return [sample for group in processes.share(samples, group_size) for sample in group]
