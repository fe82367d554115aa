"""The default plan, chosen in seconds: every candidate plan's run replayed over lengths drawn from the predictor's
own quantiles and priced by the device's cost model (cost_model.py); the cheapest one runs. Pure Python, no torch.

Why draws and not the predictions: a plan that cuts its batches at the predicted lengths (FCR) loses nothing when
every prediction is right, so pricing the predictions themselves would price FCR as an oracle. A draw gives each
request a length from its own predicted distribution, independently of the others, and a plan's price is its mean
over PLAN_DRAWS draws (the same draws for every plan, so that their differences are not noise of the draw).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .batches import ScheduleConfig
from .continuous import admission_order, simulate_continuous
from .cost_model import DeviceCosts, continuous_run_seconds, static_run_seconds
from .schedule import replay_executor, run_schedule

PLAN_DRAWS = 4
DRAW_SEED = 0  # fixed: every process and every rerun prices a group alike, and so picks the same plan


def quantile_length(levels: Sequence[float], row: Sequence[float], level: float) -> float:
    """A request's length at any level in (0, 1) from its predicted quantiles (`levels` from 0.5 up, `row` the
    lengths at them): log-linear between two predicted levels, beyond the top one along the slope of the last two,
    and below the median the mirror image of above it (the log-length taken as symmetric about the median)."""
    logs = [math.log(max(1.0, length)) for length in row]
    if level < levels[0]:  # mirrored: as far below the median's log as the level 1 - u is above it
        return math.exp(2 * logs[0] - math.log(quantile_length(levels, row, 1 - level)))
    if len(levels) == 1:
        return math.exp(logs[0])
    upper = next((index for index, known in enumerate(levels) if known >= level), len(levels) - 1)
    upper = max(1, upper)
    low, high = levels[upper - 1], levels[upper]
    weight = (level - low) / (high - low)
    return math.exp(logs[upper - 1] + weight * (logs[upper] - logs[upper - 1]))


def draw_lengths(
    rows: Mapping[str, Sequence[float]],
    levels: Sequence[float],
    cap: int,
    draws: int = PLAN_DRAWS,
    seed: int = DRAW_SEED,
) -> list[dict[str, int]]:
    """`draws` maps id -> a length drawn from its predicted quantiles, each within [1, cap]."""
    generator = random.Random(seed)
    drawn = []
    for _ in range(draws):
        drawn.append(
            {
                sample_id: min(cap, max(1, round(quantile_length(levels, row, generator.random()))))
                for sample_id, row in rows.items()
            }
        )
    return drawn


@dataclass(frozen=True)
class CandidatePlan:
    """A plan as the scheduler would run it: the lengths it orders and cuts by, and its schedule config (static
    batches) or none (one queue of continuous batching, `slots` rows at once, shortest predicted first)."""

    label: str
    predictions: Mapping[str, int]
    config: ScheduleConfig | None = None
    caps: Mapping[str, int] | None = None
    retry_caps: Sequence[Mapping[str, int]] = ()
    slots: int = 0
    in_file_order: bool = False  # a queue admitted in file order, not by prediction


def plan_seconds(
    plan: CandidatePlan, ids: list[str], lengths: Mapping[str, int], costs: DeviceCosts, prompt_tokens
) -> float:
    """The cost model's seconds for the plan's run had the answers these `lengths`."""
    if plan.config is None:
        order = admission_order(ids, None if plan.in_file_order else plan.predictions, len(ids))
        cap = max(lengths.values(), default=1)
        return continuous_run_seconds(simulate_continuous(order, lengths, plan.slots, cap), costs, prompt_tokens)
    record = run_schedule(
        ids, plan.predictions, plan.config, replay_executor(lengths), caps=plan.caps, retry_caps=plan.retry_caps
    )
    return static_run_seconds(record, costs, prompt_tokens)


def price_plans(
    plans: Sequence[CandidatePlan],
    ids: list[str],
    drawn: Sequence[Mapping[str, int]],
    costs: DeviceCosts,
    prompt_tokens,
) -> dict[str, float]:
    """Each plan's mean seconds over the drawn lengths, by label, in the order given."""
    return {
        plan.label: sum(plan_seconds(plan, ids, lengths, costs, prompt_tokens) for lengths in drawn) / len(drawn)
        for plan in plans
    }


def cheapest(prices: Mapping[str, float]) -> str:
    """The cheapest plan's label; on a tie the one listed first."""
    return min(prices, key=lambda label: prices[label])
