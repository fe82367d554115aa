"""src.infer's default plan: of the plans the engine can run, the one the device's cost model prices cheapest for
each group of requests (src.scheduling.plan_choice), and why, in words the command prints.

    before the model loads:  default_plan(args) -> the candidates, or the one fallback without a predictor
    each group:              Planner.choose(predictor, samples, cap, prompt tokens) -> the cheapest candidate
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..common.utils import UserError, resolve_device
from ..engines.registry import resolve_engine_name
from ..predictors.proxy import SHIPPED_PROXY_PATH, proxy_available
from ..scheduling.batches import clamp_prediction
from ..scheduling.cost_model import DeviceCosts
from ..scheduling.plan_choice import CandidatePlan, cheapest, draw_lengths, price_plans
from .runner import SchedulePredictions, predict_for_schedule, schedule_config
from .settings import RunSettings

# The plans priced, by engine: one queue whose rows are refilled as answers end only where the engine refills them
# itself (the slots engine, its step about as dear as a static batch's); transformers' paged manager, the other
# engines' continuous batching, has a cost the model does not price (docs/CONTINUOUS.md), so it is never a default.
QUEUE_CANDIDATES = ("continuous:proxy", "proxy+fcr+resume", "vanilla")
STATIC_CANDIDATES = ("proxy+fcr+resume", "proxy+fcr", "vanilla")
# Without a predictor that loads nothing is priced: data order, in one queue where the engine refills rows
QUEUE_FALLBACK_STRATEGY, STATIC_FALLBACK_STRATEGY = "continuous", "vanilla"
ENGINES_THAT_REFILL_ROWS = ("slots",)


def default_plan(args) -> tuple[tuple[str, ...], str]:
    """The strategies the default plan chooses among (one: nothing to choose), and why those."""
    engine = resolve_engine_name(args.engine, resolve_device(args.device))
    ready, reason = proxy_available(args.predictor_path)
    if not ready and Path(args.predictor_path) != Path(SHIPPED_PROXY_PATH):  # a folder the user typed must load
        raise UserError(f"--predictor-path {args.predictor_path}: {reason}; or leave the flag out for the shipped one")
    refills = engine in ENGINES_THAT_REFILL_ROWS
    if not ready and not Path(SHIPPED_PROXY_PATH).exists():  # the code was copied without the clone's folders
        reason = f"no shipped predictor at {SHIPPED_PROXY_PATH}: install with `pip install -e .` from the clone"
    if not ready:
        fallback = QUEUE_FALLBACK_STRATEGY if refills else STATIC_FALLBACK_STRATEGY
        return (fallback,), f"requests run in file order ({reason})"
    if refills:
        return QUEUE_CANDIDATES, f"engine {engine} gives a finished answer's row to the next request at once"
    return STATIC_CANDIDATES, f"engine {engine}'s continuous batching is transformers' manager, left out"


class KnownPredictions:
    """A predictor's answers for one group, asked once and read by every candidate plan (a second predict of the
    same prompts would cost as much as the first)."""

    def __init__(self, predictor, samples, max_length: int):
        self.name, self.max_length = predictor.name, max_length
        self.lengths = predictor.predict(samples)
        self.quantile_levels = tuple(predictor.quantile_levels)
        self.rows = {sample.id: list(predictor.quantile_rows[sample.id]) for sample in samples}

    def predict(self, samples) -> dict[str, int]:
        return {sample.id: self.lengths[sample.id] for sample in samples}

    def predict_quantile(self, samples, quantile: float) -> dict[str, int]:
        index = next(index for index, level in enumerate(self.quantile_levels) if abs(level - quantile) < 1e-9)
        return {sample.id: clamp_prediction(self.rows[sample.id][index], self.max_length) for sample in samples}


@dataclass(frozen=True)
class PlanChoice:
    strategy: object  # the Strategy that runs
    predicted: SchedulePredictions  # its predictions and caps
    prices: dict[str, float]  # every candidate's estimated seconds, by label


@dataclass(frozen=True)
class Planner:
    """The candidates of the default plan and the cost model that prices them; the settings give the batch size
    (a queue's rows too), the VBS table and +resume's retry levels."""

    settings: RunSettings
    costs: DeviceCosts

    def choose(self, predictor, samples, cap: int, prompt_tokens: dict[str, int]) -> PlanChoice:
        known = KnownPredictions(predictor, samples, cap)
        ids = [sample.id for sample in samples]
        plans, predicted = [], {}
        for strategy in self.settings.strategies:
            retry_levels = self.settings.retry_levels_of(strategy)
            predicted[strategy] = predict_for_schedule(strategy, known, samples, cap, retry_levels=retry_levels)
            plans.append(self.candidate(strategy, predicted[strategy], len(ids), cap))
        drawn = draw_lengths(known.rows, known.quantile_levels, cap)
        prices = price_plans(plans, ids, drawn, self.costs, prompt_tokens)
        strategy = next(strategy for strategy in self.settings.strategies if strategy.label == cheapest(prices))
        chosen = predicted[strategy]
        if strategy.predictor == "vanilla":  # scheduled without a prediction: its lines record the cap, as ever
            chosen = chosen._replace(lengths=dict.fromkeys(ids, cap))
        return PlanChoice(strategy, chosen, prices)

    def candidate(self, strategy, predicted: SchedulePredictions, group: int, cap: int) -> CandidatePlan:
        if strategy.continuous:
            in_file_order = strategy.predictor == "vanilla"
            slots = self.settings.batch_size
            return CandidatePlan(strategy.label, predicted.lengths, slots=slots, in_file_order=in_file_order)
        config = schedule_config(strategy, self.settings.batch_size, group, cap, self.settings.vbs_table)
        return CandidatePlan(strategy.label, predicted.lengths, config, predicted.caps, predicted.retry_caps)


def describe_choice(choice: PlanChoice, requests: int, why: str) -> str:
    """One line: the plan, its estimate against the others', and why those were the candidates."""
    chosen = choice.strategy.label
    others = ", ".join(f"{label} {seconds:.1f} s" for label, seconds in choice.prices.items() if label != chosen)
    return (
        f"plan: {chosen} for {requests} requests, estimated {choice.prices[chosen]:.1f} s of generation against "
        f"{others} ({why}; lengths drawn from the predictor's quantiles)"
    )
