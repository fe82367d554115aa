"""One registry of response-length predictors.

A predictor is a small class built from a `PredictorContext`, with one method
`predict(samples) -> dict[id, int]`; every prediction is clamped to [1, max_length].
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..common.data import Sample, load_length_file, load_max_lengths, require_ids
from ..common.prompts import PIA_PROMPT, QUERY_PROMPT
from ..common.utils import UserError
from ..scheduling.batches import clamp_prediction


@dataclass
class PredictorContext:
    """What a predictor may need; each takes only its part."""

    max_length: int
    length_path: str | None = None
    model: Any = None
    tokenizer: Any = None
    formatter: Any = None
    engine: Any = None  # src.engines.base.Engine over `model`: what the generative predictors (po, seqsch) run on
    options: dict = field(default_factory=dict)


class Predictor:
    """Every member a caller uses, with its default: a predictor gives one length per sample (`predict`), and one
    with quantiles (`has_quantiles`) also the length at an upper quantile level (`predict_quantile`), which FCR's
    caps and +resume's retries use."""

    name = ""
    needs_model = False  # generates with the served model (po, seqsch): built after the model loads
    reads_ids_from_file = False  # lengths by id from a file (--length-path, --predictions-path): ids checked early
    has_quantiles = False

    def __init__(self, context: PredictorContext):
        self.context = context
        self.unparsable = 0  # answers that gave no number (the generative predictors), each given max_length
        self.quantile_levels: tuple[float, ...] = ()  # the levels of each row of `quantile_rows`
        self.quantile_rows: dict[str, list[float]] | None = None  # id -> length at each level, from the last predict

    def require_quantile(self, quantile: float) -> None:
        """A one-line error unless the predictor gives lengths at this quantile level."""
        raise UserError(f"strategy {self.name} has no quantiles: quantile {quantile} needs a proxy predictor")

    def predict_quantile(self, samples: list[Sample], quantile: float) -> dict[str, int]:
        self.require_quantile(quantile)
        raise AssertionError("require_quantile refuses every level of a predictor without quantiles")

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


class ConstantPredictor(Predictor):
    """A baseline without perception: every sample gets one length (pass the train median of L_max)."""

    name = "constant"

    def __init__(self, context: PredictorContext):
        super().__init__(context)
        if context.options.get("constant_length") is None:
            raise UserError("strategy constant needs --constant-length (for example the train median of L_max)")

    def predict_raw(self, samples):
        return {sample.id: self.context.options["constant_length"] for sample in samples}


class OraclePredictor(Predictor):
    """The oracle: L_max, the largest recorded length over the temperatures (the paper's upper bound), or with
    option `gt_field` one column, e.g. the very lengths being replayed (a perfect predictor)."""

    name = "gt"
    reads_ids_from_file = True

    def __init__(self, context: PredictorContext):
        super().__init__(context)
        if context.length_path is None:
            raise UserError("strategy gt needs a length file: pass --length-path")
        field_name = context.options.get("gt_field")
        if field_name is None:
            self.table = load_max_lengths(context.length_path)
        else:
            rows = load_length_file(context.length_path, (field_name,))
            self.table = {sample_id: row[field_name] for sample_id, row in rows.items()}

    def predict_raw(self, samples):
        require_ids(self.table, [sample.id for sample in samples], self.context.length_path)
        return {sample.id: self.table[sample.id] for sample in samples}


_NUMBER = re.compile(r"\d[\d,]*")


def parse_length_answer(text: str) -> int | None:
    """The rule for a model's length answer: the first non-empty line; its integers (thousands commas allowed);
    one integer is the answer, two or more give the mean of the first two (a range such as "120-150" -> 135,
    as upstream); none means unparsable (None)."""
    line = next((line for line in text.splitlines() if line.strip()), "")
    numbers = [int(match.replace(",", "")) for match in _NUMBER.findall(line) if match.replace(",", "")]
    if not numbers:
        return None
    return numbers[0] if len(numbers) == 1 else round((numbers[0] + numbers[1]) / 2)


class GenerativePredictor(Predictor):
    """Asks the served model for a number, greedy, in batches; an unparsable answer gets max_length
    and is counted in `unparsable`, never raised."""

    needs_model = True
    suffix = ""
    max_new_tokens = 8  # one number and EOS

    def __init__(self, context: PredictorContext):
        super().__init__(context)
        self.answers: dict[str, str] = {}

    @contextmanager
    def prediction_mode(self):
        yield

    def predict_raw(self, samples):
        context = self.context
        batch_size = int(context.options.get("prediction_batch_size", 128))
        predictions, self.unparsable, self.answers = {}, 0, {}
        with self.prediction_mode():
            for start in range(0, len(samples), batch_size):
                batch = samples[start : start + batch_size]
                prompts = [context.formatter.encode(sample.prompt, self.suffix) for sample in batch]
                generated = context.engine.generate(prompts, self.max_new_tokens, 0.0)
                for sample, output in zip(batch, generated, strict=True):
                    value = parse_length_answer(output.text)
                    self.answers[sample.id] = output.text
                    if value is None:
                        self.unparsable += 1
                        value = context.max_length
                    predictions[sample.id] = value
        return predictions


class PerceptionOnlyPredictor(GenerativePredictor):
    """`po`: the paper's perception-in-advance prompt on the served model, no training.
    The number comes first, often after a few words, so it gets more tokens than seqsch."""

    name = "po"
    suffix = PIA_PROMPT
    max_new_tokens = 16


class InstructionTunedPredictor(GenerativePredictor):
    """`seqsch`: the LoRA length-perception adapter on the served model. The adapter is enabled only while
    predicting, so one copy of the weights serves prediction and generation, as the paper."""

    name = "seqsch"
    suffix = QUERY_PROMPT

    def __init__(self, context: PredictorContext):
        super().__init__(context)
        if not hasattr(context.model, "enable_adapter_layers"):  # a peft model: the adapter was loaded
            raise UserError("strategy seqsch needs the length perception adapter: pass --lora-path")

    @contextmanager
    def prediction_mode(self):
        self.context.model.enable_adapter_layers()
        try:
            yield
        finally:
            self.context.model.disable_adapter_layers()


class ProxyPredictor(Predictor):
    """`proxy`: a small encoder trained on the served model's lengths (python -m src.train_proxy); it reads each
    prompt once, in batches, and gives the median length and upper quantiles (for FCR caps)."""

    name = "proxy"
    has_quantiles = True

    def __init__(self, context: PredictorContext):
        super().__init__(context)
        from .proxy import LoadedProxy

        path = context.options.get("predictor_path")
        if not path:
            raise UserError(
                "strategy proxy needs --predictor-path: a folder written by python -m src.train_proxy or src.fit_proxy"
            )
        self.proxy = LoadedProxy(path, context.options.get("predictor_device") or "cpu")
        self.quantile_levels = tuple(self.proxy.quantiles)
        self.quantile_rows = {}

    def predict_raw(self, samples):
        batch_size = int(self.context.options.get("prediction_batch_size", 128))
        rows = self.proxy.predict_quantiles([sample.prompt for sample in samples], batch_size)
        self.quantile_rows = {sample.id: row for sample, row in zip(samples, rows, strict=True)}
        return {sample_id: row[0] for sample_id, row in self.quantile_rows.items()}

    def require_quantile(self, quantile: float) -> None:
        """A one-line error unless the predictor was trained with this quantile level."""
        self.proxy.quantile_index(quantile)

    def predict_quantile(self, samples: list[Sample], quantile: float) -> dict[str, int]:
        """Each sample's `quantile` length, clamped; from the last predict() of the same samples."""
        index = self.proxy.quantile_index(quantile)
        if any(sample.id not in self.quantile_rows for sample in samples):
            self.predict_raw(samples)
        return {
            sample.id: clamp_prediction(self.quantile_rows[sample.id][index], self.context.max_length)
            for sample in samples
        }


def is_prediction_row(row: dict) -> bool:
    """A line of src.predict's output: a predicted length of at least 1, and quantiles as {"0.8": length, ...}."""
    length, quantiles = row.get("predicted_length"), row.get("quantiles", {})
    return (
        isinstance(length, int)
        and not isinstance(length, bool)
        and length >= 1
        and isinstance(quantiles, dict)
        and all(isinstance(value, int) and not isinstance(value, bool) for value in quantiles.values())
        and all(is_quantile_level(name) for name in quantiles)
    )


def is_quantile_level(name: str) -> bool:
    """A quantile's key as src.predict writes it: a number strictly between 0 and 1 ("0.8")."""
    try:
        return 0.0 < float(name) < 1.0  # False for nan, which every comparison refuses
    except ValueError:
        return False


class FilePredictor(Predictor):
    """`file`: the lengths and quantiles that src.predict wrote (--predictions-path), so that a machine without the
    predictor (a GPU host without the encoder's package) schedules with its predictions: predict where the predictor
    is installed, generate where the model runs."""

    name = "file"
    reads_ids_from_file = True
    has_quantiles = True  # those the file has; a level it lacks is refused by require_quantile

    def __init__(self, context: PredictorContext):
        super().__init__(context)
        from ..common.answers import read_complete_lines

        path = context.options.get("predictions_path")
        if not path:
            raise UserError("strategy file needs --predictions-path: a file written by python -m src.predict")
        rows = read_complete_lines(Path(path), is_row=is_prediction_row, what="a prediction line")
        if not Path(path).is_file() or not rows:
            raise UserError(f"--predictions-path {path} holds no predictions: write it with python -m src.predict")
        self.path, self.rows = path, {row["id"]: row for row in rows}
        if len(self.rows) < len(rows):  # a second row of an id would silently replace the first
            seen = set()
            twice = next(row["id"] for row in rows if row["id"] in seen or seen.add(row["id"]))
            raise UserError(f"--predictions-path {path}: id {twice!r} appears twice; keep one prediction per id")
        level_sets = {tuple(sorted(row.get("quantiles", {}))) for row in rows}
        names = level_sets.pop() if len(level_sets) == 1 else ()  # levels only where every row has the same ones
        self.quantile_levels = tuple(sorted(float(name) for name in names))
        self.level_names = {float(name): name for name in names}

    def predict_raw(self, samples):
        require_ids(self.rows, [sample.id for sample in samples], self.path)
        if self.quantile_levels:  # else None, as for every predictor without quantiles
            self.quantile_rows = {
                sample.id: [
                    self.rows[sample.id]["quantiles"][self.level_names[level]] for level in self.quantile_levels
                ]
                for sample in samples
            }
        return {sample.id: self.rows[sample.id]["predicted_length"] for sample in samples}

    def require_quantile(self, quantile: float) -> None:
        if not any(abs(level - quantile) < 1e-9 for level in self.quantile_levels):
            levels = ", ".join(f"{level:g}" for level in self.quantile_levels) or "none"
            raise UserError(f"--predictions-path {self.path} has no quantile {quantile:g} (it has {levels})")

    def predict_quantile(self, samples: list[Sample], quantile: float) -> dict[str, int]:
        self.require_quantile(quantile)
        index = next(i for i, level in enumerate(self.quantile_levels) if abs(level - quantile) < 1e-9)
        self.predict_raw(samples)
        return {
            sample.id: clamp_prediction(self.quantile_rows[sample.id][index], self.context.max_length)
            for sample in samples
        }


PREDICTORS: dict[str, type[Predictor]] = {
    cls.name: cls
    for cls in (
        VanillaPredictor,
        ConstantPredictor,
        OraclePredictor,
        PerceptionOnlyPredictor,
        InstructionTunedPredictor,
        ProxyPredictor,
        FilePredictor,
    )
}


def build_predictor(name: str, context: PredictorContext) -> Predictor:
    if name not in PREDICTORS:
        raise UserError(f"unknown strategy {name!r}: choose from {', '.join(sorted(PREDICTORS))}")
    return PREDICTORS[name](context)
