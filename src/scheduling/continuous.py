"""The iteration model of continuous batching, as pure Python over lengths: which request enters a freed slot, and
when each one finishes, counted in decode steps. The dry run uses it in place of an engine, and a real run's token
columns come from it with the lengths the engine generated."""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from dataclasses import dataclass


def admission_order(ids: list[str], predictions: Mapping[str, int] | None, group_size: int) -> list[str]:
    """The queue of a continuous-batching run: data order (FCFS), or shortest prediction first within each
    group, so that no request waits behind a later group's (the groups arrive one after another)."""
    if predictions is None:
        return list(ids)
    order: list[str] = []
    for first in range(0, len(ids), group_size):
        order.extend(sorted(ids[first : first + group_size], key=lambda sample_id: predictions[sample_id]))
    return order


@dataclass(frozen=True)
class ContinuousRecord:
    order: list[str]  # admission order
    lengths: dict[str, int]
    finished: dict[str, bool]
    finish_steps: dict[str, int]  # the iteration in which each sample produced its last token
    slots: int
    arrival_steps: dict[str, float] | None = None  # when each request arrived; None: all at once, at 0


def simulate_continuous(order: list[str], lengths: Mapping[str, int], slots: int, max_length: int) -> ContinuousRecord:
    """Iteration-level batching with `slots` sequences at most: every iteration each running sequence makes one
    token, and a slot freed in one iteration takes the next queued request in the next. A sample of length L
    admitted after iteration t finishes at t + L (its prefill makes its first token)."""
    if slots < 1:
        raise ValueError("slots must be at least 1")
    free_at = [0] * slots  # heap: the iteration after which each slot is free
    finish: dict[str, int] = {}
    capped: dict[str, int] = {}
    for sample_id in order:
        capped[sample_id] = min(max(1, int(lengths[sample_id])), max_length)
        start = heapq.heappop(free_at)
        finish[sample_id] = start + capped[sample_id]
        heapq.heappush(free_at, finish[sample_id])
    finished = {sample_id: int(lengths[sample_id]) <= max_length for sample_id in order}
    return ContinuousRecord(list(order), capped, finished, finish, slots)


def simulate_continuous_arrivals(
    arrival_steps: Mapping[str, float],
    lengths: Mapping[str, int],
    slots: int,
    max_length: int,
    priorities: Mapping[str, float] | None = None,
    aging: float = 0.0,
) -> ContinuousRecord:
    """Iteration-level batching of requests that arrive over time (in decode steps). Whenever a slot is free, the
    waiting request with the smallest `priority - aging x steps waited` is admitted: with `priorities` the predicted
    lengths, shortest first, where aging lets a long request that has waited `p / aging` steps overtake any newcomer
    (the guard against starving it); without priorities, first come first served. Ties go to the earlier arrival.
    A request admitted at step t finishes at t + its length, as in `simulate_continuous`."""
    if slots < 1:
        raise ValueError("slots must be at least 1")
    arriving = sorted(arrival_steps, key=lambda sample_id: (arrival_steps[sample_id], sample_id))
    position = {sample_id: index for index, sample_id in enumerate(arriving)}
    free_at = [0.0] * slots  # heap: when each slot is free
    waiting: list[str] = []
    order: list[str] = []
    finish: dict[str, int] = {}
    capped = {sample_id: min(max(1, int(lengths[sample_id])), max_length) for sample_id in arriving}
    next_arrival = 0

    def admission_key(sample_id: str, now: float) -> tuple[float, int]:
        if priorities is None:
            return (arrival_steps[sample_id], position[sample_id])
        return (priorities[sample_id] - aging * (now - arrival_steps[sample_id]), position[sample_id])

    while len(order) < len(arriving):
        now = max(heapq.heappop(free_at), 0.0)
        if not waiting and next_arrival < len(arriving):  # the slot idles until the next request arrives
            now = max(now, arrival_steps[arriving[next_arrival]])
        while next_arrival < len(arriving) and arrival_steps[arriving[next_arrival]] <= now:
            waiting.append(arriving[next_arrival])
            next_arrival += 1
        chosen = min(waiting, key=lambda sample_id, at=now: admission_key(sample_id, at))
        waiting.remove(chosen)
        order.append(chosen)
        start = -(-now // 1)  # admissions happen between iterations
        finish[chosen] = int(start) + capped[chosen]
        heapq.heappush(free_at, float(finish[chosen]))
    finished = {sample_id: int(lengths[sample_id]) <= max_length for sample_id in arriving}
    return ContinuousRecord(order, capped, finished, finish, slots, dict(arrival_steps))
