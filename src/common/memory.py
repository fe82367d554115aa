"""The one home of memory budgets: what share of the memory that is free when a use begins it may take, and why.

Three uses hold memory beyond the model's weights and a batch's own cache. Each share is of the memory free when that
use first asks: the compiled engine's static caches at its start, +resume's kept rows at the first row kept (so on
the compiled engine a quarter of what its caches left), and VBS auto's largest batch at the calibration, before any
strategy runs (that budget sizes one batch, which then runs alone). What no share takes is for activations and the
allocator.
"""

from __future__ import annotations

import os

# +resume's kept KV caches (each unfinished row's cache, so that its retry skips the prefill):
# a quarter, so that the batches running meanwhile still fit; a failure past the budget is prefilled again.
KEPT_ROW_CACHES = 0.25
# The compiled engine's static caches, one per (rows, cache length) shape, the least recently used dropped first:
# half, since a replayed CUDA graph needs its cache at the same address and dropping one means recording again.
COMPILED_STATIC_CACHES = 0.5
# The KV cache of the largest batch that VBS auto may choose (batch size x context): most of the memory, because that
# batch is the only large thing alive while it runs; the rest is for activations.
VBS_LARGEST_BATCH = 0.8


def budget_bytes(share: float, device) -> int | None:
    """`share` of the memory free on `device` now; None where the free memory is unknown."""
    free = free_memory_bytes(device)
    return None if free is None else int(free * share)


def free_memory_bytes(device) -> int | None:
    """Free memory of a CUDA device, or the host's available memory for any other; None where unknown."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
