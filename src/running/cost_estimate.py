"""`--device-profile`: the cost model a run's seconds are estimated with, named (a device measured elsewhere, from
src/scheduling/device_profiles.json) or measured through the engine at the start of a real run, and what each
result records of it: the plan's estimated seconds beside the measured ones."""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from pathlib import Path

from ..common.utils import UserError, user_cache_dir, write_json_atomic
from ..scheduling.continuous import ContinuousRecord
from ..scheduling.cost_model import (
    DeviceCosts,
    approximate_prompt_tokens,
    continuous_run_seconds,
    costs_from_json,
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
        f"prefill per token) and report them beside the measured ones (src.infer's default plan also prices its "
        f"candidates with it; without the flag, with this engine's costs from the cache); {MEASURE}: time this "
        f"device through the engine first (real runs). {described}",
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


def cost_cache_path() -> Path:
    """Where measured cost models are kept: device-costs.json in the user's cache folder."""
    return user_cache_dir() / "device-costs.json"


def device_key(engine, largest_batch: int, prompt_tokens: int, new_tokens: int) -> dict:
    """What a measured cost model holds for: the device by name, the model's shape (its config.json), the dtype,
    the engine, torch's version (kernels change) and the measurement's own sizes."""
    import platform

    import torch

    if engine.device.startswith("cuda"):
        device = torch.cuda.get_device_name(engine.device)
    else:  # the kind first: an MPS run and a CPU run on one machine are two devices
        device = f"{engine.device.split(':')[0]}: {cpu_name() or platform.machine()}, {torch.get_num_threads()} threads"
    config = engine.model.config.to_json_string(use_diff=False)
    return {
        "device": device,
        "model_config_sha256": hashlib.sha256(config.encode()).hexdigest(),
        "dtype": str(engine.model.dtype).removeprefix("torch."),
        "engine": engine.name,
        "torch": torch.__version__,
        "rows": largest_batch,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
    }


def cpu_name() -> str | None:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)


def cached_costs(engine, largest_batch: int, prompt_tokens: int, new_tokens: int) -> DeviceCosts:
    """This device's cost model from the cache, or measured now (measured_costs) and kept
    there for the next run of the same model, dtype and engine on the same device. Runs that start together on an
    empty cache take turns (a lock beside it): the second reads what the first measured, instead of both measuring
    at once, each slowed by the other."""
    import fcntl

    key = device_key(engine, largest_batch, prompt_tokens, new_tokens)
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cost_cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        entries = read_cost_cache(path)
        kept = cached_entry(entries.get(name), key)
        if kept is not None:
            return kept
        print(f"measuring this device's costs for the plan, once (kept in {path})", file=sys.stderr, flush=True)
        costs = measured_costs(engine, largest_batch, prompt_tokens, new_tokens)
        entries[name] = {"key": key, "costs": costs.to_json()}
        try:
            write_json_atomic(path, entries)
        except OSError as error:  # a cache that cannot be written costs a measurement next time, nothing else
            print(f"note: the cost model was not kept in {path} ({error.strerror})", file=sys.stderr, flush=True)
    return costs


def cached_entry(entry, key: dict) -> DeviceCosts | None:
    """A kept cost model, where it is one for `key` with a step cost for some rows and every figure a finite
    number of 0 or more; None (measured again) for anything else."""
    try:
        costs = costs_from_json(entry["costs"]["name"], entry["costs"])
        figures = [*costs.steps.base.values(), costs.steps.per_context_token, costs.prefill_per_token]
        if entry["key"] != key or not costs.steps.base or not all(0 <= float(value) < math.inf for value in figures):
            return None
    except Exception:  # noqa: BLE001 - whatever a hand edit or another version left there is measured again
        return None
    return costs


def read_cost_cache(path: Path) -> dict:
    """The cache's entries; none where it is missing or unreadable (it is measured again and rewritten)."""
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


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
