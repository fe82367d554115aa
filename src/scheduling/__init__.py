"""The scheduler, importable: lengths in, batches out, as plain data, with no model and no torch.

    from src.scheduling import BatchOutcome, ScheduleConfig, run_schedule

    config = ScheduleConfig(batch_size=16, max_length=256, fcr=True, resume=False)
    record = run_schedule(ids, predictions, config, run_batch)  # predictions: id -> length in [1, 256]

`run_schedule` plans each group's first batches (similar predicted lengths together, each cut at its longest
prediction), calls your `run_batch(batch) -> BatchOutcome` on each, and with `fcr` runs the samples that did not
finish again: at each of `retry_caps` (upper quantiles, such as RESUME_RETRY_QUANTILES of a predictor with
quantiles), then at `max_length`. A `Batch` has `ids` and `max_new_tokens`; the outcome gives each id's generated
length, whether it finished, and its text. docs/API.md shows it driving transformers' `generate`.
"""

from .batches import (
    BUCKET_CELL,
    PAPER_VBS_TABLE,
    RESUME_RETRY_QUANTILES,
    Batch,
    ScheduleConfig,
    bucket_of,
    clamp_prediction,
    plan_first_batches,
    plan_recompute,
)
from .schedule import BatchOutcome, ExecutedBatch, RunRecord, SampleResult, run_schedule

__all__ = [
    "BUCKET_CELL",
    "PAPER_VBS_TABLE",
    "RESUME_RETRY_QUANTILES",
    "Batch",
    "BatchOutcome",
    "ExecutedBatch",
    "RunRecord",
    "SampleResult",
    "ScheduleConfig",
    "bucket_of",
    "clamp_prediction",
    "plan_first_batches",
    "plan_recompute",
    "run_schedule",
]
