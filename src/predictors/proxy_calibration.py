"""The proxy's quantile recalibration: one log offset per level, fitted on held-out train rows so that each upper
quantile covers its share of lengths there (a head trained on few rows under-covers); the offsets are stored in the
predictor's config and applied on load (src.predictors.proxy.LoadedProxy)."""

from __future__ import annotations

import math


def recalibration_offsets(levels, predicted: list[list[float]], targets: list[int]) -> list[float]:
    """Split-conformal quantile recalibration: for each level q, the log-offset that makes exactly a share q of these
    rows' lengths fall at or under their shifted q-quantile (the q-th empirical quantile of log(target) -
    log(predicted), taken upward so that coverage is at least q). Fitted on held-out train rows, it corrects a head
    that covers too few or too many."""
    offsets = []
    for index, level in enumerate(levels):
        residuals = sorted(
            math.log(max(1, target)) - math.log(row[index]) for row, target in zip(predicted, targets, strict=True)
        )
        rank = min(len(residuals) - 1, max(0, math.ceil(level * len(residuals)) - 1))
        offsets.append(residuals[rank] + 1e-9)  # the row at the boundary stays covered despite rounding
    return offsets


def calibration_record(levels, predicted: list[list[float]], targets: list[int], data_path: str) -> dict:
    """The quantile offsets fitted on the held-out rows, and the coverage of each level before and after, printed."""
    offsets = recalibration_offsets(levels, predicted, targets)

    def coverage(shift) -> list[float]:
        return [
            sum(target <= row[index] * math.exp(shift[index]) for row, target in zip(predicted, targets, strict=True))
            / len(targets)
            for index in range(len(levels))
        ]

    before, after = coverage([0.0] * len(levels)), coverage(offsets)
    print(
        "quantile recalibration on the held-out rows (coverage before -> after): "
        + ", ".join(
            f"q{level:g} {old * 100:.1f} -> {new * 100:.1f} %"
            for level, old, new in zip(levels, before, after, strict=True)
        )
    )
    return {
        "log_offsets": offsets,
        "fitted_on": f"the last {len(targets)} rows of {data_path}",
        "coverage_before": before,
        "coverage_after": after,
    }
