"""The engines by name: every way this project runs a model is an `Engine` (src.engines.base), one module with one
class, named here; `--engine NAME` selects it."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ..common.utils import UserError

if TYPE_CHECKING:
    from .base import Engine

# name -> "module:class", imported when chosen, so that choosing one never imports another's dependencies
ENGINES = {
    "transformers": "src.engines.eager:TransformersEngine",
    "compiled": "src.engines.compiled:CompiledEngine",
    "graph": "src.engines.graph:GraphEngine",
    "captured": "src.engines.captured:CapturedEngine",
    "slots": "src.engines.slots:SlotEngine",
}
# `--engine auto`: the compiled engine where it pays (CUDA graphs); elsewhere the slots engine, whose static batches are
# eager `generate` (docs/CPU.md's measurement) and whose continuous batching refills a static cache's rows itself
AUTO_ENGINE = "auto"
DEFAULT_ENGINE = AUTO_ENGINE


def resolve_engine_name(name: str, device: str) -> str:
    """`auto` -> compiled on CUDA, slots on any other device; any other name as it is."""
    if name != AUTO_ENGINE:
        return name
    return "compiled" if str(device).startswith("cuda") else "slots"


def build_engine(name: str, model, tokenizer) -> Engine:
    name = resolve_engine_name(name, model.device.type)
    if name not in ENGINES:
        raise UserError(f"unknown --engine {name!r}: choose from {', '.join([AUTO_ENGINE, *sorted(ENGINES)])}")
    module_name, _, class_name = ENGINES[name].partition(":")
    return getattr(importlib.import_module(module_name), class_name)(model, tokenizer)
