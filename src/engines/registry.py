"""The engines by name: every way this project runs a model is an `Engine` (src.engines.base), named here; `--engine
NAME` selects it. Three classes, none derived from another: the eager `transformers` engine, the `slots` engine, and
the static-cache engine, built with one of its decode steps (src.engines.decode_steps) under that step's name."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ..common.utils import UserError

if TYPE_CHECKING:
    from .base import Engine

# Imported when chosen, so that choosing one never imports another's dependencies.
# name -> "module:class" of an engine class taking (model, tokenizer)
ENGINE_CLASSES = {
    "transformers": "src.engines.eager:TransformersEngine",
    "slots": "src.engines.slots:SlotEngine",
}
# name -> "module:class" of a decode step (taking the device) that src.engines.static_cache.StaticCacheEngine runs
STATIC_CACHE_STEPS = {
    "compiled": "src.engines.decode_steps:GenerateStep",
    "graph": "src.engines.decode_steps:CompiledStep",
    "captured": "src.engines.decode_steps:CapturedStep",
}
# `--engine auto`: the compiled engine where it pays (CUDA graphs); elsewhere the slots engine, whose static batches are
# eager `generate` (docs/CPU.md's measurement) and whose continuous batching refills a static cache's rows itself
AUTO_ENGINE = "auto"
DEFAULT_ENGINE = AUTO_ENGINE


def engine_names() -> list[str]:
    """Every --engine name but auto, sorted."""
    return sorted(ENGINE_CLASSES | STATIC_CACHE_STEPS)


def resolve_engine_name(name: str, device: str) -> str:
    """`auto` -> compiled on CUDA, slots on any other device; any other name as it is."""
    if name != AUTO_ENGINE:
        return name
    return "compiled" if str(device).startswith("cuda") else "slots"


def build_engine(name: str, model, tokenizer) -> Engine:
    name = resolve_engine_name(name, model.device.type)
    if name not in engine_names():
        raise UserError(f"unknown --engine {name!r}: choose from {', '.join([AUTO_ENGINE, *engine_names()])}")
    if name in ENGINE_CLASSES:
        return _imported(ENGINE_CLASSES[name])(model, tokenizer)
    from .static_cache import StaticCacheEngine

    return StaticCacheEngine(model, tokenizer, name, _imported(STATIC_CACHE_STEPS[name])(model.device))


def _imported(where: str):
    module_name, _, name = where.partition(":")
    return getattr(importlib.import_module(module_name), name)
