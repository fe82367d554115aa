"""`--vbs-table auto`, the choice: a variable-batch-size table fitted to the device's step costs instead of the paper's
A100 table, chosen by a cost model over lengths (no torch; src.running.vbs_calibration measures the costs).

The paper's table (50:256 ... 300:16) pays off where a decode step costs about the same for 16 or 256
sequences and memory caps the long buckets (Vicuna-7B on an A100). Elsewhere the curve of step cost
against batch size and context differs (on a 2-core CPU a slot at 64 rows costs about half of one at
16, and large batches pad more), so a short calibration measures what a decode step costs here, and the
table is chosen to minimise the estimated time of the schedule.

"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .batches import ScheduleConfig, bucket_of, plan_first_batches

# Batch sizes tried, and the longest one allowed: the paper's largest batch.
CANDIDATE_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Prompt tokens of the calibration's short context (about an Alpaca prompt in a chat template).
CALIBRATION_PROMPT = 64


@dataclass(frozen=True)
class StepCosts:
    """Seconds per decode step: `base[b]` at the short context for batch size b, plus `per_context_token`
    seconds for each sequence's each further context token (attention reads the whole cache)."""

    base: dict[int, float]
    per_context_token: float
    context: int = CALIBRATION_PROMPT
    largest_batch: int = max(CANDIDATE_BATCH_SIZES)  # the largest size that fitted in memory
    kv_token_budget: int | None = None  # cache tokens that fit in memory (batch x context); None: no limit

    def seconds(self, batch_size: int, context: float) -> float:
        sizes = sorted(self.base)
        if batch_size in self.base:
            base = self.base[batch_size]
        elif batch_size < sizes[0]:  # below the measurements: no dearer than the smallest (weights read once a step)
            base = self.base[sizes[0]]
        elif batch_size > sizes[-1]:  # beyond the measurements: slots cost what the largest measured ones did
            base = self.base[sizes[-1]] * batch_size / sizes[-1]
        else:  # linear between the neighbours
            upper = next(size for size in sizes if size > batch_size)
            lower = max(size for size in sizes if size < batch_size)
            weight = (batch_size - lower) / (upper - lower)
            base = self.base[lower] * (1 - weight) + self.base[upper] * weight
        return base + self.per_context_token * batch_size * max(0.0, context - self.context)

    def to_json(self) -> dict:
        return {
            "base_seconds_per_step": {str(size): value for size, value in self.base.items()},
            "per_context_token_seconds": self.per_context_token,
            "context": self.context,
            "largest_batch": self.largest_batch,
            "kv_token_budget": self.kv_token_budget,
        }

    def fits(self, batch_size: int, context: int) -> bool:
        return self.kv_token_budget is None or batch_size * context <= self.kv_token_budget


def estimate_seconds(batches, predictions, prompt_length: float, costs: StepCosts) -> float:
    """A schedule's decode time if every sample ran exactly to its prediction."""
    total = 0.0
    for batch in batches:
        steps = min(batch.max_new_tokens, max(predictions[sample_id] for sample_id in batch.ids))
        total += steps * costs.seconds(len(batch.ids), prompt_length + steps / 2)
    return total


def choose_schedule(
    ids: list[str],
    predictions: dict[str, int],
    config: ScheduleConfig,
    costs: StepCosts,
    prompt_length: float,
    candidates: tuple[int, ...] = CANDIDATE_BATCH_SIZES,
) -> ScheduleConfig:
    """The schedule with the shortest estimated time: per-bucket batch sizes (and the remainder merge
    threshold) by coordinate descent over the buckets, or, where no table beats it, plain sorting into
    equal batches of the best single size (on a CPU, where a slot costs the same at any batch size)."""
    allowed = [size for size in candidates if size <= costs.largest_batch] or [1]
    buckets = sorted({bucket_of(prediction) for prediction in predictions.values()})
    context = round(prompt_length)

    def sizes_for(cap: int) -> list[int]:  # the batch sizes whose cache fits with this cap
        return [size for size in allowed if costs.fits(size, context + cap)] or [1]

    def estimate(trial: ScheduleConfig) -> float:
        total = 0.0
        for group, first in enumerate(range(0, len(ids), config.group_size)):
            batches = plan_first_batches(ids[first : first + config.group_size], predictions, trial, group)
            total += estimate_seconds(batches, predictions, prompt_length, costs)
        return total

    def with_table(table: dict[int, int], default: int) -> ScheduleConfig:
        return replace(config, vbs=True, vbs_table=dict(table), vbs_default_batch_size=default)

    default = config.vbs_default_batch_size
    # a bucket's batch may hold samples carried up from below, and FCR may let it run to the max length
    table = {bucket: min(config.batch_size, sizes_for(config.max_length)[-1]) for bucket in buckets}
    for _ in range(2):  # a second pass lets early buckets react to the later ones' choices
        for bucket in buckets:
            cap = min(bucket, config.max_length) if config.fcr else config.max_length
            table[bucket] = min(sizes_for(cap), key=lambda size: estimate(with_table({**table, bucket: size}, default)))
        # the merge threshold: the paper's (a remainder under 16 moves up) or only under half a batch
        default = min((config.vbs_default_batch_size, 1), key=lambda value: estimate(with_table(table, value)))
    sorted_plans = [replace(config, vbs=False, batch_size=size) for size in sizes_for(config.max_length)]
    return min([with_table(table, default), *sorted_plans], key=estimate)
