"""The metrics, one definition each: a static schedule's, continuous batching's, several processes' merged, and
the length predictors' accuracy.

For one run over N samples (docs/METRICS.md): a batch's steps are its longest generated length; token slots are
steps x batch size over every batch run, failed FCR first attempts included; `average_length` = token slots / N;
`effective_token_ratio` = generated tokens of the final results / token slots (under FCR's +resume a final result
holds the tokens of its earlier attempts too, whose slots counted when they ran); `failure_ratio` = recomputed
samples / N; `truncated_ratio` = final results without EOS / N. `token_ratios` is the only place that divides.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TypedDict

from .batches import bucket_of
from .continuous import ContinuousRecord
from .schedule import RunRecord, final_batches


class TokenMetrics(TypedDict):
    """What one run's token accounting gives, static or continuous (the dry run's whole clock)."""

    num_samples: int
    num_batches: int  # 0 under continuous batching
    decode_steps: int  # batch steps summed; iterations under continuous batching
    token_slots: int
    generated_tokens: int
    recomputed_samples: int
    resumed_tokens: int  # tokens FCR's resumed samples had made and continued from (+resume only)
    average_length: float
    effective_token_ratio: float
    failure_ratio: float
    truncated_ratio: float
    mean_latency_steps: float
    p90_latency_steps: float


class StrategyResult(TokenMetrics, total=False):
    """One strategy's result: the JSON's `results[i]`, which the printout, src.plots and src.reproduce read."""

    strategy: str  # its label, e.g. gt+vbs+fcr or continuous:proxy
    predictor: str
    vbs: bool
    fcr: bool
    resume: bool
    continuous: bool
    throughput_samples_per_s: float  # N / (prediction + generation time); K processes: N / the slowest one's
    wall_time_s: float
    prediction_time_s: float
    generation_time_s: float
    generated_tokens_per_s: float
    token_slots_per_s: float
    mean_latency_s: float  # real runs only
    estimated_seconds: float  # generation's seconds by the cost model of --device-profile (when given)
    device_profile: str
    p90_latency_s: float
    unparsable_predictions: int
    oom_splits: int
    batch_size: int
    slots: int | None  # continuous batching's budget, None for static strategies
    group_size: int
    max_length: int
    temperature: float
    seed: int
    dry_run: bool
    processes: int
    fcr_quantile: float | None
    fcr_retry_quantiles: list[float]  # the caps of FCR's retries before the last, at max_length
    vbs_table: dict | None  # VBS strategies: the table used (bucket -> batch size)
    vbs_default_batch_size: int
    sorted_batch_size: int
    batches: list[dict]  # each run batch: group, recompute, bucket, size, cap, steps, useful_tokens, elapsed_s
    samples: list[dict]  # each sample by id: prediction, length, finished, recomputed, first_cap, latency_*
    process_wall_times_s: list[float]  # several processes only
    process_decode_steps: list[int]


def token_ratios(num_samples: int, token_slots: int, generated_tokens: int, recomputed: int, truncated: int) -> dict:
    """The ratios of every kind of run, from its counts."""
    return {
        "average_length": token_slots / num_samples if num_samples else 0.0,
        "effective_token_ratio": generated_tokens / token_slots if token_slots else 0.0,
        "failure_ratio": recomputed / num_samples if num_samples else 0.0,
        "truncated_ratio": truncated / num_samples if num_samples else 0.0,
    }


# --------------------------------------------------------------------------- one run


def data_order_token_slots(lengths: Sequence[int], batch_size: int) -> int:
    """The token slots of the same samples batched as they come (vanilla): consecutive batches of `batch_size`,
    each running as long as its longest member; `lengths` in data order, each at most the cap."""
    return sum(
        max(lengths[start : start + batch_size]) * len(lengths[start : start + batch_size])
        for start in range(0, len(lengths), batch_size)
    )


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile: the smallest value with at least `fraction` of the values at or below it."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(1, math.ceil(fraction * len(ordered))) - 1]


def latency_metrics(finish: Mapping[str, float], unit: str) -> dict:
    """Mean, p90 and largest per-sample latency: finish times counted from each sample's arrival (the start of
    the run where all samples arrive at once). The largest shows a starved request."""
    values = list(finish.values())
    return {
        f"mean_latency_{unit}": sum(values) / len(values) if values else 0.0,
        f"p90_latency_{unit}": percentile(values, 0.9),
        f"max_latency_{unit}": max(values, default=0.0),
    }


def compute_metrics(record: RunRecord) -> TokenMetrics:
    """A static schedule's metrics, the one definition used by the engine, the dry run and the tests.

    token slots count every batch run, failed FCR first attempts included; generated tokens count the
    final results only. Latency in steps is the decode steps run before a sample's result (the dry run's
    clock: on a memory-bound GPU a step costs about the same at any batch size).
    """
    num_samples = len(record.results)
    token_slots = sum(batch.token_slots for batch in record.batches)
    generated_tokens = sum(result.length for result in record.results.values())
    recomputed = sum(result.recomputed for result in record.results.values())
    truncated = sum(not result.finished for result in record.results.values())
    return {
        "num_samples": num_samples,
        "num_batches": len(record.batches),
        "decode_steps": sum(batch.steps for batch in record.batches),
        "token_slots": token_slots,
        "generated_tokens": generated_tokens,
        "recomputed_samples": recomputed,
        # carried over: outside the token slots; a real run prefills them again unless it kept their KV cache
        "resumed_tokens": sum(sum(batch.batch.resume_from or ()) for batch in record.batches),
        **token_ratios(num_samples, token_slots, generated_tokens, recomputed, truncated),
        **latency_metrics({sample_id: steps for sample_id, (steps, _) in final_batches(record).items()}, "steps"),
    }


def compute_continuous_metrics(record: ContinuousRecord) -> TokenMetrics:
    """The same columns as `compute_metrics`: token slots are iterations x the slot budget, so a slot left
    empty while the queue runs dry is wasted like a padding slot of a static batch."""
    num_samples = len(record.lengths)
    steps = max(record.finish_steps.values(), default=0)
    token_slots = steps * record.slots
    generated_tokens = sum(record.lengths.values())
    truncated = sum(not finished for finished in record.finished.values())
    return {
        "num_samples": num_samples,
        "num_batches": 0,
        "decode_steps": steps,
        "token_slots": token_slots,
        "generated_tokens": generated_tokens,
        "recomputed_samples": 0,
        "resumed_tokens": 0,
        **token_ratios(num_samples, token_slots, generated_tokens, 0, truncated),
        **latency_metrics(continuous_latency_steps(record), "steps"),
    }


def continuous_latency_steps(record: ContinuousRecord) -> dict[str, float]:
    """Each request's latency in decode steps: its finish step less its arrival (0 when all arrive at once)."""
    arrivals = record.arrival_steps or {}
    return {sample_id: step - arrivals.get(sample_id, 0.0) for sample_id, step in record.finish_steps.items()}


# --------------------------------------------------------------------------- several processes


# Counts that add up over processes; every ratio is recomputed from the sums.
ADDITIVE_FIELDS = (
    "num_samples",
    "num_batches",
    "decode_steps",
    "token_slots",
    "generated_tokens",
    "recomputed_samples",
    "resumed_tokens",
    "oom_splits",
    "unparsable_predictions",
)
# Fields of the schedule that a process may choose for itself (VBS auto plans from its own groups' predictions).
PER_PROCESS_FIELDS = ("vbs_table", "vbs_default_batch_size", "sorted_batch_size")


def merge_process_results(results: list[StrategyResult], ids: list[str]) -> StrategyResult:
    """One strategy's result from the results of K processes that ran disjoint groups side by side.

    Counts add; ratios are recomputed from them. The processes started together, so the run took as long
    as its slowest process: throughput is all samples over that wall time, and prediction and generation
    time are that process's. Latency comes from every sample's own finish time on its process's clock, so
    it falls as processes are added, as a user's waiting time would. Samples come back in `ids` order.
    """
    if len(results) == 1:
        return results[0]
    merged = dict(results[0])
    for name in ADDITIVE_FIELDS:
        merged[name] = sum(result[name] for result in results)
    rows = {row["id"]: row | {"process": rank} for rank, result in enumerate(results) for row in result["samples"]}
    if sorted(rows) != sorted(ids) or sum(len(result["samples"]) for result in results) != len(ids):
        raise RuntimeError("the processes' samples do not cover every id exactly once")
    merged["samples"] = [rows[sample_id] for sample_id in ids]
    merged["engine_warmup_s"] = max(result.get("engine_warmup_s", 0.0) for result in results)
    if "estimated_seconds" in merged:  # the processes run side by side: the slowest one's
        merged["estimated_seconds"] = max(result["estimated_seconds"] for result in results)
    # a process numbers its own groups 0, 1, ...; its group g is the run's group g * K + rank (share_groups)
    merged["batches"] = [
        batch | {"group": batch["group"] * len(results) + rank, "process": rank}
        for rank, result in enumerate(results)
        for batch in result["batches"]
    ]
    count, token_slots = merged["num_samples"], merged["token_slots"]
    truncated = sum(not row["finished"] for row in merged["samples"])
    merged.update(token_ratios(count, token_slots, merged["generated_tokens"], merged["recomputed_samples"], truncated))
    slowest = max(results, key=lambda result: result["wall_time_s"])
    for name in ("wall_time_s", "prediction_time_s", "generation_time_s"):
        merged[name] = slowest[name]
    merged["throughput_samples_per_s"] = count / slowest["wall_time_s"]
    merged["generated_tokens_per_s"] = merged["generated_tokens"] / slowest["generation_time_s"]
    merged["token_slots_per_s"] = token_slots / slowest["generation_time_s"]
    for unit in ("steps", "s"):
        if f"mean_latency_{unit}" in merged:
            merged.update(latency_metrics({row["id"]: row[f"latency_{unit}"] for row in merged["samples"]}, unit))
    for name in PER_PROCESS_FIELDS:  # the main process's choice stays in its field; the others' go beside it
        values = [result.get(name) for result in results]
        if any(value != values[0] for value in values):
            merged[f"process_{name}"] = values
    merged["processes"] = len(results)
    merged["process_wall_times_s"] = [result["wall_time_s"] for result in results]
    # a dry run's only clock: how evenly the groups spread the work over the processes
    merged["process_decode_steps"] = [result["decode_steps"] for result in results]
    return merged


# --------------------------------------------------------------------------- length prediction


def length_metrics(predictions: list[int], targets: list[int]) -> dict:
    """The paper's Error, Acc-50 and Acc-100, plus ranking and bucket agreement (accuracies as fractions)."""
    from scipy.stats import kendalltau, spearmanr

    count = len(targets)
    errors = [abs(prediction - target) for prediction, target in zip(predictions, targets, strict=True)]
    constant = len(set(predictions)) < 2  # a rank correlation is undefined for a constant predictor
    return {
        "num_samples": count,
        "error": sum(errors) / count,
        "acc_50": sum(error <= 50 for error in errors) / count,
        "acc_100": sum(error <= 100 for error in errors) / count,
        "kendall_tau": 0.0 if constant else float(kendalltau(predictions, targets).statistic),
        "spearman": 0.0 if constant else float(spearmanr(predictions, targets).statistic),
        "bucket_accuracy": sum(
            bucket_of(prediction) == bucket_of(target) for prediction, target in zip(predictions, targets, strict=True)
        )
        / count,
    }


def quantile_coverage(levels: list[float], quantile_rows: list[list[float]], targets: list[int]) -> list[dict]:
    """Calibration of predicted quantiles: for each level q, the share of samples whose real length is at most their
    predicted q-quantile (`coverage`; q itself when calibrated) and `coverage - q`. A cap at a quantile that covers
    less than its level sends more samples to FCR's recompute than it promises."""
    count = len(targets)
    rows = []
    for index, level in enumerate(levels):
        covered = sum(target <= row[index] for row, target in zip(quantile_rows, targets, strict=True))
        rows.append({"level": level, "coverage": covered / count, "gap": covered / count - level})
    return rows
