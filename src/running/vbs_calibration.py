"""The device's costs timed through the engine on random prompts: decode steps (the step costs from which
src.scheduling.vbs_choice picks each bucket's batch size under `--vbs-table auto`) and prefills (with the steps, the
cost model of `--device-profile measure`). The only part of either that touches the device."""

from __future__ import annotations

import time

from ..common.utils import UserError
from ..scheduling.vbs_choice import CALIBRATION_PROMPT, CANDIDATE_BATCH_SIZES, StepCosts

# decode steps per batch size in --device-profile measure's sweep: enough for a mean, few enough for a CPU
BASE_STEPS = 16


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


def measure_device_costs(engine, largest_batch: int, prompt_tokens: int, new_tokens: int) -> tuple[StepCosts, float]:
    """`--device-profile measure`: the decode step by rows and context, and the prefill per token, read from the
    engine's own step clock (`last_timing`) over random prompts, every row replayed to the end. The step at each
    candidate batch size up to `largest_batch` is one call's mean over BASE_STEPS steps after a short prompt; one
    call of 16 rows (fewer where fewer fit) with `prompt_tokens`-token prompts decoding `new_tokens` steps gives
    the prefill (its seconds over its tokens) and the growth with the context."""
    import torch

    vocabulary = engine.model.config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(0)

    def timed_call(rows: int, context: int, steps: int):
        # prompts: [rows, context]
        prompts = torch.randint(100, vocabulary, (rows, context), generator=generator).tolist()
        engine.generate(prompts, steps, 0.0, [steps] * rows)
        if engine.last_timing is None:
            raise UserError(f"--device-profile measure: engine {engine.name} keeps no step clock; name a profile")
        return engine.last_timing

    timed_call(1, CALIBRATION_PROMPT, BASE_STEPS)  # warm-up: first-call allocations and kernel selection
    base: dict[int, float] = {}
    for rows in (size for size in CANDIDATE_BATCH_SIZES if size <= largest_batch):
        try:
            timing = timed_call(rows, CALIBRATION_PROMPT, BASE_STEPS)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            break
        base[rows] = timing.decode_s / timing.decode_steps
    if not base:
        raise RuntimeError("--device-profile measure: even a batch of one ran out of memory")
    rows, prompt_tokens = min(16, max(base)), max(1, prompt_tokens)
    timing = timed_call(rows, prompt_tokens, max(BASE_STEPS, new_tokens))
    prefill = timing.prefill_s / (rows * prompt_tokens)
    # the long call's mean step against the base step of as many rows, over the mean caches of the two: the whole
    # call's mean, as a tenth of its steps against another swings with the host's speed
    context = CALIBRATION_PROMPT + BASE_STEPS // 2
    further = prompt_tokens + timing.decode_steps // 2 - context
    growth = (timing.decode_s / timing.decode_steps - base[rows]) / (rows * further) if further > 0 else 0.0
    return StepCosts(base, max(0.0, growth), context, max(base), kv_token_budget(engine.model)), prefill


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
