"""src.infer's default plan: which strategy answers a user's requests fastest on the engine that runs them, and why,
in words the command prints."""

from __future__ import annotations

from pathlib import Path

from ..common.utils import UserError, resolve_device
from ..engines.registry import resolve_engine_name
from ..predictors.proxy import SHIPPED_PROXY_PATH, proxy_available

# The default plan, by engine: where the engine keeps its rows busy itself (the slots engine: continuous batching on
# a static cache, each step about as dear as a static batch's), every request goes into one queue, shortest predicted
# first; elsewhere (the compiled engine on CUDA, whose continuous batching is transformers' slower manager) the best
# static schedule a predictor with quantiles allows (docs/RESUME.md). Without the predictor: data order.
QUEUE_STRATEGY, QUEUE_FALLBACK_STRATEGY = "continuous:proxy", "continuous"
STATIC_STRATEGY, STATIC_FALLBACK_STRATEGY = "proxy+fcr+resume", "vanilla"
ENGINES_THAT_REFILL_ROWS = ("slots",)


def default_strategy(args) -> tuple[str, str]:
    """The default plan and why: one queue on an engine that refills its rows, else static batches; shortest
    predicted first with a predictor that loads, else data order."""
    engine = resolve_engine_name(args.engine, resolve_device(args.device))
    ready, reason = proxy_available(args.predictor_path)
    if not ready and Path(args.predictor_path) != Path(SHIPPED_PROXY_PATH):  # a folder the user typed must load
        raise UserError(f"--predictor-path {args.predictor_path}: {reason}; or leave the flag out for the shipped one")
    if engine in ENGINES_THAT_REFILL_ROWS:
        why = f"engine {engine} gives a finished answer's row to the next request at once"
        if ready:
            return QUEUE_STRATEGY, why + ", shortest predicted answer first"
        return QUEUE_FALLBACK_STRATEGY, why + f", in file order ({reason})"
    why = f"engine {engine} runs static batches fastest (its continuous batching is transformers' manager)"
    if ready:
        return STATIC_STRATEGY, why + "; batches of similar predicted length, cut at the prediction and resumed"
    return STATIC_FALLBACK_STRATEGY, why + f"; in file order ({reason})"
