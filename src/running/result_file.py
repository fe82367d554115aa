"""A benchmark's result file: written once, when every strategy has finished, so that a failed or interrupted run
leaves an earlier complete file as it was. Meanwhile each finished strategy is kept in `<output>.partial`, with what
identifies the run (its flags, a fingerprint of each input file, and once the model is loaded its device, engine and
process count); the same run started again keeps those results and runs only the rest, and any other run is refused
rather than mixed with them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..common.distributed import Processes
from ..common.provenance import describe_device, library_versions
from ..common.utils import (
    UserError,
    partial_path,
    path_fingerprint,
    read_json,
    write_json_atomic,
)

if TYPE_CHECKING:
    from .runner import Executors
    from .settings import RunSettings

# what a real run resolved from its flags: a partial made on other hardware or with another engine is not continued
RESOLVED_KEYS = ("device_resolved", "engine_resolved", "processes", "model_path", "device_name")


def run_identity(flags: dict, inputs: dict[str, str | None]) -> dict:
    """The run's flags and the fingerprints of its input files (flag -> path)."""
    return {"flags": flags, "inputs": {flag: path_fingerprint(path) for flag, path in inputs.items()}}


def earlier_results(output_json: str | None, identity: dict, processes: Processes) -> tuple[dict[str, dict], dict]:
    """Strategy label -> result, and the resolved run record, of an interrupted run of this same command (from its
    partial file; empty without one); another run's partial file, or a damaged one, is refused."""
    results, record = {}, {}
    path = partial_path(output_json) if output_json else None
    if processes.is_main and path is not None and path.is_file():
        try:
            earlier = read_json(path, "partial result file")
            mismatch = earlier.get("identity") != identity
            results = {result["strategy"]: result for result in earlier.get("results", [])}
            record = earlier.get("args") or {}
        except (UserError, AttributeError, KeyError, TypeError):
            raise UserError(f"{path} is damaged: delete it to run every strategy again") from None
        if mismatch:
            raise UserError(
                f"{path} holds results of other flags or input files: rerun that command to finish it, or delete it"
            )
    return processes.broadcast((results, record) if processes.is_main else None)


def check_same_hardware(output_json: str, earlier_record: dict, record: dict) -> None:
    """Once the model is loaded: the kept results were measured where this run measures."""
    different = [key for key in RESOLVED_KEYS if key in earlier_record and earlier_record[key] != record.get(key)]
    if different:
        key = different[0]
        raise UserError(
            f"{partial_path(output_json)} was measured with {key} {earlier_record[key]}, this run has "
            f"{record.get(key)}: rerun it there, or delete the partial file"
        )


def keep_finished(output_json: str, output: dict, identity: dict) -> None:
    write_json_atomic(partial_path(output_json), output | {"identity": identity})


def write_complete(output_json: str, output: dict) -> None:
    """The complete output replaces any earlier one in one step; the partial file goes."""
    write_json_atomic(output_json, output)
    partial_path(output_json).unlink(missing_ok=True)


def run_record(args, settings: RunSettings, executors: Executors, model_path, device, processes: Processes) -> dict:
    """The output's "args": every flag as resolved, and what the run found (model, device, versions)."""
    record = vars(args) | {
        "slots": settings.slots,
        "fcr_retry_quantiles": None if settings.fcr_retry_quantiles is None else list(settings.fcr_retry_quantiles),
        "vbs_table_parsed": None if settings.vbs_table is None else dict(settings.vbs_table),
        "strategies": [strategy.label for strategy in settings.strategies],
        "model_path": model_path,
    }
    if executors.calibration is not None:  # what --vbs-table auto measured, beside the arguments as before
        record["vbs_calibration"] = executors.calibration
    if executors.device_costs is not None:
        record["device_costs"] = executors.device_costs.to_json()
    record["longest_prompt_tokens"] = max(executors.prompt_lengths.values()) if executors.prompt_lengths else 0
    record["device_resolved"] = device
    record["engine_resolved"] = executors.engine.name if executors.engine is not None else None
    record["engine_warmup_before_strategies_s"] = executors.warmup_seconds()  # the first compilation, untimed
    record["device_name"] = None if args.dry_run else describe_device(device)
    record["versions"] = library_versions()
    record["processes"] = processes.count
    return record
