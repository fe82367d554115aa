"""`--vbs-table auto`, the measurement: decode steps timed through the engine on random prompts, the step costs from
which src.scheduling.vbs_choice picks each bucket's batch size. The only part of VBS auto that touches the device."""

from __future__ import annotations

import time

from ..scheduling.vbs_choice import CALIBRATION_PROMPT, CANDIDATE_BATCH_SIZES, StepCosts


def kv_token_budget(model) -> int | None:
    """Cache tokens (summed over a batch) that fit in VBS's share of the device's free memory. None where the model's
    shape or free memory is unknown."""
    from ..common.memory import VBS_LARGEST_BATCH, budget_bytes
    from ..common.models import kv_cache_bytes_per_token

    bytes_per_token = kv_cache_bytes_per_token(model)
    budget = budget_bytes(VBS_LARGEST_BATCH, model.device)
    if bytes_per_token is None or budget is None:
        return None
    return budget // bytes_per_token


def calibrate_step_costs(engine, largest_batch: int, longest_context: int) -> StepCosts:
    """Time decode steps through the engine on random prompts: every candidate batch size up to `largest_batch` at
    the short context, then one batch size at `longest_context` for the context term. A batch size that runs out
    of memory ends the sweep (the memory budget)."""
    import torch

    step_seconds = engine.decode_step_seconds
    step_seconds(1, CALIBRATION_PROMPT)  # warm-up: first-call allocations and kernel selection
    base: dict[int, float] = {}
    for batch_size in (size for size in CANDIDATE_BATCH_SIZES if size <= largest_batch):
        try:
            base[batch_size] = step_seconds(batch_size, CALIBRATION_PROMPT)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            break
    if not base:
        raise RuntimeError("vbs auto: even a batch of one ran out of memory during calibration")
    probe = min(8, max(base))
    long_context = max(longest_context, CALIBRATION_PROMPT + 1)
    try:
        extra = step_seconds(probe, long_context) - base[probe]
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        extra = 0.0
    per_token = max(0.0, extra / (probe * (long_context - CALIBRATION_PROMPT)))
    return StepCosts(base, per_token, CALIBRATION_PROMPT, max(base), kv_token_budget(engine.model))


def describe(costs: StepCosts, seconds: float) -> str:
    slots = ", ".join(f"{size}: {value * 1000 / size:.2f}" for size, value in sorted(costs.base.items()))
    return (
        f"vbs auto: calibration {seconds:.1f} s; ms per token slot by batch size {{{slots}}}; "
        f"+{costs.per_context_token * 1e6:.3f} us per slot per context token"
    )


def timed_calibration(engine, largest_batch, longest_context) -> tuple[StepCosts, float]:
    start = time.perf_counter()
    costs = calibrate_step_costs(engine, largest_batch, longest_context)
    return costs, time.perf_counter() - start
