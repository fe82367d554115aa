"""The strategy grammar of `--strategy`/`--strategies`: `gt+vbs+fcr`, `proxy+fcr+resume`, `continuous:proxy`.

A strategy is a length predictor and the modifiers that say how its lengths are used: sorted batches, a variable
batch size per bucket (VBS), a cap at the prediction with failures recomputed (FCR), failures that continue from their
tokens (resume), or iteration-level batching ordered by the predictions (continuous). Adding a modifier means a field
of `Strategy`, its name in `STRATEGY_MODIFIERS`, and its effect on the `ScheduleConfig` (src.running.runner).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from ..common.utils import UserError

STRATEGY_MODIFIERS = ("vbs", "fcr", "resume")
CONTINUOUS = "continuous"


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


def parse_strategy(text: str, predictors: Collection[str], vbs: bool = False, fcr: bool = False) -> Strategy:
    """`gt+vbs+fcr` -> Strategy('gt', True, True); --vbs/--fcr add to every strategy but vanilla,
    which is the unscheduled baseline by definition. `+resume` (with FCR) lets failures continue from the tokens
    they made. `continuous` is continuous batching in data order (FCFS), `continuous:gt` admits shortest predicted
    first (any predictor); VBS and FCR do not apply to it. `predictors`: the names a strategy may start with
    (src.predictors.registry.PREDICTORS; passed in, so that the grammar needs no model code)."""
    text = text.strip()
    if text == CONTINUOUS or text.startswith(CONTINUOUS + ":"):
        _, _, order_by = text.partition(":")
        if order_by and order_by not in predictors:
            raise UserError(f"unknown predictor {order_by!r} in {text!r}: choose from {', '.join(sorted(predictors))}")
        return Strategy(order_by or "vanilla", continuous=True)
    name, *modifiers = text.split("+")
    if name == CONTINUOUS:
        raise UserError(f"{text!r}: VBS and FCR do not apply to continuous batching, which has no batch to cut")
    if name not in predictors:
        raise UserError(f"unknown strategy {name!r}: choose from {', '.join(sorted(predictors))}")
    unknown = [modifier for modifier in modifiers if modifier not in STRATEGY_MODIFIERS]
    if unknown:
        raise UserError(f"unknown strategy modifier {unknown[0]!r} in {text!r}: use +vbs, +fcr and/or +resume")
    if name == "vanilla":
        if modifiers:  # --vbs and --fcr pass over vanilla; a modifier written on it would be silently dropped
            raise UserError(
                f"{text!r}: vanilla is the unscheduled baseline, with no lengths to batch or cut by; +vbs, +fcr and "
                "+resume need a predictor (e.g. proxy+fcr+resume)"
            )
        return Strategy("vanilla")
    fcr = fcr or "fcr" in modifiers
    if "resume" in modifiers and not fcr:
        raise UserError(f"{text!r}: +resume continues FCR's failures, so it needs +fcr (e.g. {name}+fcr+resume)")
    return Strategy(name, vbs or "vbs" in modifiers, fcr, resume="resume" in modifiers)
