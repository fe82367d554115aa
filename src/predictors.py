"""One registry of response-length predictors.

A predictor is a small class built from a `PredictorContext`, with one method
`predict(samples) -> dict[id, int]`; every prediction is clamped to [1, max_length].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .data import LENGTH_FIELDS, Sample, load_length_file, max_over_temperatures, require_ids
from .schedule import clamp_prediction
from .utils import UserError


@dataclass
class PredictorContext:
    """What a predictor may need; each takes only its part."""

    max_length: int
    length_path: str | None = None
    model: Any = None
    tokenizer: Any = None
    formatter: Any = None
    options: dict = field(default_factory=dict)


class Predictor:
    name = ""
    needs_model = False
    uses_length_file = False

    def __init__(self, context: PredictorContext):
        self.context = context

    def predict(self, samples: list[Sample]) -> dict[str, int]:
        raw = self.predict_raw(samples)
        return {sample.id: clamp_prediction(raw[sample.id], self.context.max_length) for sample in samples}

    def predict_raw(self, samples: list[Sample]) -> dict[str, float]:
        raise NotImplementedError


class VanillaPredictor(Predictor):
    """No perception: every sample may run to max_length (the paper's baseline)."""

    name = "vanilla"

    def predict_raw(self, samples):
        return {sample.id: self.context.max_length for sample in samples}


class OraclePredictor(Predictor):
    """The oracle upper bound: L_max, the largest recorded length over the four temperatures."""

    name = "gt"
    uses_length_file = True

    def __init__(self, context: PredictorContext):
        super().__init__(context)
        if context.length_path is None:
            raise UserError("strategy gt needs a length file: pass --length-path")
        self.table = load_length_file(context.length_path, LENGTH_FIELDS)

    def predict_raw(self, samples):
        require_ids(self.table, [sample.id for sample in samples], self.context.length_path)
        return {sample.id: max_over_temperatures(self.table[sample.id]) for sample in samples}


PREDICTORS: dict[str, type[Predictor]] = {cls.name: cls for cls in (VanillaPredictor, OraclePredictor)}


def build_predictor(name: str, context: PredictorContext) -> Predictor:
    if name not in PREDICTORS:
        raise UserError(f"unknown strategy {name!r}: choose from {', '.join(sorted(PREDICTORS))}")
    return PREDICTORS[name](context)
