"""One frozen settings object for running strategies, built once from a command's arguments: the strategies parsed,
the VBS table and the slots resolved, and (once the predictors are built) the quantile levels of +resume's retries.
Library code takes this object, never the argparse namespace."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from ..common.cli import check_range
from ..common.utils import UserError
from ..engines.base import DEFAULT_CONTINUOUS_SPEED
from ..predictors.registry import PREDICTORS
from ..scheduling.batches import PAPER_VBS_TABLE, RESUME_RETRY_QUANTILES, parse_vbs_table
from ..scheduling.strategy import CONTINUOUS, STRATEGY_MODIFIERS, Strategy, parse_strategy

# --slots auto: continuous batching gets the KV-cache memory of the largest static batch that ran before it
AUTO_SLOTS = "auto"
AUTO_VBS_TABLE = "auto"


@dataclass(frozen=True)
class RunSettings:
    strategies: tuple[Strategy, ...] = ()
    max_length: int = 512
    batch_size: int = 16
    group_size: int = 256
    slots: int | str = 16  # continuous batching's most concurrent requests, or AUTO_SLOTS
    continuous_speed: str = DEFAULT_CONTINUOUS_SPEED  # continuous batching's step settings (CONTINUOUS_SPEEDS)
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 42
    dry_run: bool = False  # no model: lengths are replayed, times measure the scheduler alone
    bucket_predictions: bool = False  # every prediction rounded up to its 50-token bucket (the paper's seqsch form)
    fcr_quantile: float | None = None  # FCR caps at this upper quantile of each length instead of the prediction
    fcr_retry_quantiles: tuple[float, ...] | None = None  # as asked (--fcr-retry-quantiles); None: the default
    vbs_table: Mapping[int, int] | None = field(default_factory=lambda: dict(PAPER_VBS_TABLE))  # None: auto
    arrival_rate: float | None = None  # dry-run continuous batching: requests per decode step; None: all at once
    aging: float = 0.0
    debug: bool = False
    inject_oom_above: int | None = None  # testing: batches above this size raise an out-of-memory error
    device_profile: str | None = None  # the cost model each result's estimated seconds come from; None: no estimate
    # predictor name -> the levels of +resume's capped retries, resolved against the built predictors
    retry_levels: Mapping[str, tuple[float, ...]] = field(default_factory=dict)

    def retry_levels_of(self, strategy: Strategy) -> list[float]:
        return list(self.retry_levels.get(strategy.predictor, ())) if strategy.resume else []

    def with_predictors(self, predictors: Mapping[str, object]) -> RunSettings:
        """The settings with +resume's retry levels resolved against the built predictors' quantile levels; a level
        a predictor lacks is refused here, before any strategy runs."""
        levels = {}
        for strategy in self.strategies:
            predictor = predictors.get(strategy.predictor)  # None: one built after the model loads (no quantiles)
            available = predictor.quantile_levels if predictor is not None else None
            wanted = [self.fcr_quantile] if strategy.fcr and self.fcr_quantile is not None else []
            retry = resume_retry_levels(strategy, self.fcr_retry_quantiles, available)
            for level in wanted + retry if predictor is not None else ():
                predictor.require_quantile(level)
            if strategy.resume:
                levels[strategy.predictor] = tuple(retry)
        return replace(self, retry_levels=levels)


def strategy_choices() -> str:
    """Every strategy the --strategy flags take, in words, for --help."""
    predictors = ", ".join(name for name in sorted(PREDICTORS) if name != "vanilla")
    modifiers = ", ".join(f"+{modifier}" for modifier in STRATEGY_MODIFIERS)
    return (
        f"vanilla (file order, no prediction); a predictor ({predictors}) with any of {modifiers} (+resume with +fcr); "
        f"{CONTINUOUS} or {CONTINUOUS}:PREDICTOR"
    )


def parse_strategies(texts: list[str], vbs: bool = False, fcr: bool = False) -> tuple[Strategy, ...]:
    return tuple(parse_strategy(text, PREDICTORS, vbs, fcr) for text in texts)


def parse_vbs_table_flag(text: str, flag: str = "--vbs-table") -> dict[int, int] | None:
    """A `bucket:size,...` table, or None for auto."""
    if text == AUTO_VBS_TABLE:
        return None
    try:
        return parse_vbs_table(text)
    except ValueError as error:
        raise UserError(f"{flag}: {error}") from None


def require_quantiles(strategy: Strategy, option: str = "--fcr-quantile") -> None:
    """`--fcr-quantile` and `--fcr-retry-quantiles` cap FCR batches at upper quantiles, which only predictors with
    quantiles give."""
    if strategy.fcr and not PREDICTORS[strategy.predictor].has_quantiles:
        raise UserError(f"{option} needs a predictor with quantiles (proxy), not {strategy.predictor}")


def resume_retry_levels(strategy: Strategy, requested, available=None) -> list[float]:
    """The quantile levels of a strategy's capped FCR retries (before the last, at max_length): +resume strategies
    only, whose failures lose nothing by stopping again; `requested` (--fcr-retry-quantiles, [] for none) or, by
    default, those of RESUME_RETRY_QUANTILES that the predictor has (`available`: its levels, when known)."""
    if not strategy.resume:
        return []
    if requested is None:
        if not PREDICTORS[strategy.predictor].has_quantiles:
            return []
        return [level for level in RESUME_RETRY_QUANTILES if available is None or level in available]
    if requested:
        require_quantiles(strategy, "--fcr-retry-quantiles")
    return list(requested)


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


def parse_slots(text: str | None, batch_size: int) -> int | str:
    """--slots: a number of slots, auto, or (not given) the batch size."""
    if text is None:
        return batch_size
    if text == AUTO_SLOTS:
        return text
    try:
        slots = int(text)
    except ValueError:
        raise UserError(f"--slots expected a number of slots or {AUTO_SLOTS}, got {text!r}") from None
    check_range("--slots", slots, 1)
    return slots


def run_settings(args) -> RunSettings:
    """The settings every strategy of src.benchmark runs with, resolved from the flags once; every mistake in them
    is refused here, before the first strategy runs and writes its result."""
    texts = args.strategies or [args.strategy]
    if args.strategies is None and args.strategy == CONTINUOUS and args.order == "predicted":
        texts = [f"{CONTINUOUS}:{args.order_predictor}"]
    strategies = parse_strategies(texts, args.vbs, args.fcr)
    static = [strategy.label for strategy in strategies if not strategy.continuous]
    if args.arrival_rate is not None and static:
        raise UserError(
            f"--arrival-rate applies to continuous batching only; {static[0]!r} is a static strategy whose latency "
            "counts from the start: run it in another command"
        )
    retry_quantiles = parse_retry_quantiles(args.fcr_retry_quantiles)
    for strategy in strategies:
        if args.fcr_quantile is not None:
            require_quantiles(strategy)
        resume_retry_levels(strategy, retry_quantiles)
    if retry_quantiles and not any(strategy.resume for strategy in strategies):
        raise UserError("--fcr-retry-quantiles caps the retries of +resume strategies, and none is asked for")
    return RunSettings(
        strategies=strategies,
        max_length=args.max_length,
        batch_size=args.batch_size,
        group_size=args.group_size,
        slots=parse_slots(args.slots, args.batch_size),
        continuous_speed=args.continuous_speed,
        temperature=args.temperature,
        seed=args.seed,
        dry_run=args.dry_run,
        bucket_predictions=args.bucket_predictions,
        fcr_quantile=args.fcr_quantile,
        fcr_retry_quantiles=None if retry_quantiles is None else tuple(retry_quantiles),
        vbs_table=parse_vbs_table_flag(args.vbs_table),
        arrival_rate=args.arrival_rate,
        aging=args.aging,
        debug=args.debug,
        inject_oom_above=args.inject_oom_above,
        device_profile=args.device_profile,
    )


def equal_memory_slots(results: list, longest_prompt: int, max_length: int, batch_size: int) -> int:
    """`--slots auto`: the continuous-batching slots that the KV-cache memory of the largest static batch among
    `results` holds. A static batch holds rows x (its longest prompt + its cap) cache tokens; a slot reserves room for
    the longest request, longest prompt + max_length (src.engines.continuous sizes the cache so). The dry run
    knows no prompts and counts generated tokens only. Without a static result: --batch-size slots, the static
    default's memory."""
    largest = max(
        (row["cache_tokens"] for result in results if not result["continuous"] for row in result["batches"]),
        default=0,
    )
    if not largest:
        return batch_size
    return max(1, largest // (longest_prompt + max_length))
