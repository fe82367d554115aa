"""`--device-profile`: the cost model a run's seconds are estimated with, named (a device measured elsewhere, from
src/scheduling/device_profiles.json) or measured through the engine at the start of a real run, and what each
result records of it: the plan's estimated seconds beside the measured ones."""

from __future__ import annotations

import time

from ..common.utils import UserError
from ..scheduling.continuous import ContinuousRecord
from ..scheduling.cost_model import (
    DeviceCosts,
    approximate_prompt_tokens,
    continuous_run_seconds,
    load_profiles,
    static_run_seconds,
)

MEASURE = "measure"  # time decode steps and prefills through the engine before the first strategy
# the prompt length src.infer measures its device at: it reads its requests group by group, after the measurement
TYPICAL_PROMPT_TOKENS = 128


def add_device_profile_argument(parser) -> None:
    profiles = load_profiles()
    described = "; ".join(f"{name}: {profile.source.split(';')[0]}" for name, profile in sorted(profiles.items()))
    parser.add_argument(
        "--device-profile",
        choices=(*sorted(profiles), MEASURE),
        default=None,
        help="estimate each strategy's seconds with this device's cost model (decode step by rows and context, "
        f"prefill per token) and report them beside the measured ones; {MEASURE}: time this device through the "
        f"engine first (real runs). {described}",
    )


def check_device_profile(args) -> None:
    """A dry run has no device to measure."""
    if args.device_profile == MEASURE and args.dry_run:
        raise UserError("--device-profile measure times the device, and a dry run loads no model: name a profile")


def dry_run_costs(name: str | None, samples) -> tuple[DeviceCosts | None, dict[str, int] | None]:
    """A named profile and each sample's prompt tokens as the dry run estimates them (it has no tokenizer)."""
    if name is None:
        return None, None
    return load_profiles()[name], {sample.id: approximate_prompt_tokens(sample.prompt) for sample in samples}


def measured_costs(engine, largest_batch: int, prompt_tokens: int, new_tokens: int) -> DeviceCosts:
    """The device's cost model timed through the engine (vbs_calibration.measure_device_costs) on prompts of the
    run's mean length, decoding `new_tokens` steps; its source says how long the measurement took."""
    from .vbs_calibration import measure_device_costs

    start = time.perf_counter()
    steps, prefill = measure_device_costs(engine, largest_batch, prompt_tokens, new_tokens)
    source = f"measured through engine {engine.name} on {engine.device} in {time.perf_counter() - start:.1f} s"
    return DeviceCosts(steps, prefill, MEASURE, source)


def estimated_seconds(costs: DeviceCosts, prompt_tokens, record) -> float:
    """The seconds the cost model gives the run that was recorded: a static RunRecord or a ContinuousRecord."""
    estimate = continuous_run_seconds if isinstance(record, ContinuousRecord) else static_run_seconds
    return estimate(record, costs, prompt_tokens)


def estimate_fields(costs: DeviceCosts | None, prompt_tokens, record) -> dict:
    """What a benchmark result records of the estimate: its seconds and the profile they come from; nothing
    without a profile."""
    if costs is None:
        return {}
    return {"estimated_seconds": estimated_seconds(costs, prompt_tokens, record), "device_profile": costs.name}


def final_lengths(record) -> dict[str, int]:
    """Each sample's generated tokens in all, from either kind of record."""
    if isinstance(record, ContinuousRecord):
        return dict(record.lengths)
    return {sample_id: result.length for sample_id, result in record.results.items()}


def describe_costs(costs: DeviceCosts) -> str:
    steps = ", ".join(f"{rows}: {seconds * 1000:.2f}" for rows, seconds in sorted(costs.steps.base.items()))
    return (
        f"device profile {costs.name}: ms per decode step by rows {{{steps}}}, "
        f"+{costs.steps.per_context_token * 1e6:.3f} us per row per context token, "
        f"prefill {costs.prefill_per_token * 1e6:.1f} us per token ({costs.source})"
    )
