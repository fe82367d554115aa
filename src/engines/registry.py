"""The engine boundary: every way this project runs a model goes through an `Engine`.

The scheduler never touches a model: `strategies` hands an engine static batches of token ids (with a cap and,
optionally, replayed lengths) or a queue for continuous batching; the generative length predictors, `src.lenpred`
and the VBS calibration use the same three methods. An engine is one module with one class; adding one means
writing that module and naming it in `ENGINES`, and `--engine NAME` selects it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from ..common.utils import UserError

if TYPE_CHECKING:
    from .continuous import ContinuousOutcome
    from .generate import GeneratedSample

# name -> "module:class", imported when chosen, so that choosing one never imports another's dependencies
ENGINES = {
    "transformers": "src.engines.eager:TransformersEngine",
    "compiled": "src.engines.compiled:CompiledEngine",
}
# `--engine auto`: the compiled engine where it pays (CUDA graphs), eager elsewhere (docs/CPU.md's measurement)
AUTO_ENGINE = "auto"
DEFAULT_ENGINE = AUTO_ENGINE


def resolve_engine_name(name: str, device: str) -> str:
    """`auto` -> compiled on CUDA, transformers on any other device; any other name as it is."""
    if name != AUTO_ENGINE:
        return name
    return "compiled" if str(device).startswith("cuda") else "transformers"


class Engine(Protocol):
    model: object
    tokenizer: object
    device: str

    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        temperature: float = 0.0,
        replay_lengths: list[int] | None = None,
    ) -> list[GeneratedSample]:
        """One static batch: every row runs until all finished or `max_new_tokens`; results in prompt order."""

    def run_queue(
        self,
        order: list[str],
        prompt_ids: dict[str, list[int]],
        max_length: int,
        slots: int,
        temperature: float = 0.0,
        replay: dict[str, int] | None = None,
        on_result: Callable[[int], None] | None = None,
        seed: int | None = None,
    ) -> ContinuousOutcome:
        """Continuous batching: requests admitted in `order`, at most `slots` at once."""

    def decode_step_seconds(self, batch_size: int, context: int) -> float:
        """The time of one decode step of `batch_size` sequences at a `context`-token cache (VBS auto)."""


def build_engine(name: str, model, tokenizer) -> Engine:
    name = resolve_engine_name(name, model.device.type)
    if name not in ENGINES:
        raise UserError(f"unknown --engine {name!r}: choose from {', '.join([AUTO_ENGINE, *sorted(ENGINES)])}")
    module_name, _, class_name = ENGINES[name].partition(":")
    return getattr(importlib.import_module(module_name), class_name)(model, tokenizer)
