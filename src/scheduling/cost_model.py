"""Seconds from a schedule, as pure Python: a device's cost model (decode step by rows and context, prefill by
prompt token) and the seconds it gives a static run or a continuous one, so that a plan measured in token slots is
also checked in time.

    static batch of R rows, longest context P, longest answer L:   R x P x prefill + (L - 1) x step(R) + context term
    continuous run:   each request's prefill  +  step(rows decoding) for every iteration  +  context term

The context term is the step's growth with the cache it reads: `per_context_token` seconds per row per cache token
beyond the calibration's context, summed over every row's every step, so it is one sum per sample in both cases.
Profiles of named devices (`--device-profile`) are in device_profiles.json beside this file, each with its source.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .batches import ScheduleConfig
from .continuous import ContinuousRecord
from .schedule import RunRecord, replay_executor, run_schedule
from .vbs_choice import StepCosts

PROFILES_FILE = Path(__file__).with_name("device_profiles.json")
# The dry run has no tokenizer: a prompt's tokens in Vicuna's template are taken as TEMPLATE_TOKENS + characters /
# CHARACTERS_PER_TOKEN, the line fitted to the LLaMA tokenizer's counts over the paper's 1024-prompt val draw (mean
# error 3 tokens, mean prompt 95 tokens).
TEMPLATE_TOKENS, CHARACTERS_PER_TOKEN = 33, 4.0


@dataclass(frozen=True)
class DeviceCosts:
    """What a device charges: `steps` (decode step seconds by rows and context) and `prefill_per_token` (seconds per
    prompt token a prefill processes, padding included)."""

    steps: StepCosts
    prefill_per_token: float
    name: str = "measured"
    source: str = ""  # where the figures come from: the command and machine, or the published numbers

    def prefill_seconds(self, rows: int, context: int) -> float:
        return rows * context * self.prefill_per_token

    def context_seconds(self, context: int, steps: int) -> float:
        """One row's context term over `steps` decode steps that start with `context` tokens in its cache."""
        return self.steps.per_context_token * cache_tokens_beyond(self.steps.context, context, steps)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "source": self.source,
            "prefill_seconds_per_token": self.prefill_per_token,
            **self.steps.to_json(),
        }


def approximate_prompt_tokens(text: str) -> int:
    """A prompt's tokens in Vicuna's template, without a tokenizer (the dry run's)."""
    return TEMPLATE_TOKENS + round(len(text) / CHARACTERS_PER_TOKEN)


def cache_tokens_beyond(base: int, context: int, steps: int) -> int:
    """sum over t in [0, steps) of max(0, context + t - base): the cache tokens past `base` that the steps read."""
    first_above = max(0, base - context)  # the first step whose cache is longer than base
    count = steps - first_above
    if count <= 0:
        return 0
    first = context + first_above - base  # 0 where the row starts below base, else context - base
    return count * first + count * (count - 1) // 2


def static_run_seconds(record: RunRecord, costs: DeviceCosts, prompt_tokens: Mapping[str, int]) -> float:
    """A static run's seconds: every batch that ran (each piece of an out-of-memory split on its own) prefills its
    rows left-padded to its longest context (a resumed member's context holds the tokens it had) and decodes until
    its longest member stops, every row reading its cache at every step."""
    total = 0.0
    for executed in record.batches:
        batch = executed.batch
        progress = dict(zip(batch.ids, batch.resume_from or (0,) * len(batch.ids), strict=True))
        for run in executed.runs:
            context = max(prompt_tokens[sample_id] + progress[sample_id] for sample_id in run)
            steps = max(executed.lengths[sample_id] for sample_id in run) - 1  # the prefill made the first token
            total += costs.prefill_seconds(len(run), context)
            total += steps * costs.steps.seconds(len(run), costs.steps.context)
            total += len(run) * costs.context_seconds(context + 1, steps)
    return total


def continuous_run_seconds(record: ContinuousRecord, costs: DeviceCosts, prompt_tokens: Mapping[str, int]) -> float:
    """A continuous run's seconds: each request's prefill (which makes its first token), then one decode step of
    every live row per iteration. In the iteration model a request of length L that finishes at iteration f holds
    its row in iterations f - L + 1 ... f, the first of them its prefill's, so it decodes in the last L - 1."""
    decoding = [0] * (max(record.finish_steps.values(), default=0) + 1)  # rows decoding, by iteration
    total = 0.0
    for sample_id in record.order:
        length, finish = record.lengths[sample_id], record.finish_steps[sample_id]
        for iteration in range(finish - length + 2, finish + 1):
            decoding[iteration] += 1
        total += costs.prefill_seconds(1, prompt_tokens[sample_id])
        total += costs.context_seconds(prompt_tokens[sample_id] + 1, length - 1)
    return total + sum(costs.steps.seconds(rows, costs.steps.context) for rows in decoding if rows)


def data_order_seconds(
    ids: list[str], lengths: Mapping[str, int], costs: DeviceCosts, prompt_tokens: Mapping[str, int], batch_size: int
) -> float:
    """What the same requests would have cost as plain batches in the order given (vanilla), each batch running
    until its longest answer (`lengths`, as generated) ends."""
    if not ids:
        return 0.0
    config = ScheduleConfig(batch_size=batch_size, group_size=len(ids), max_length=max(lengths.values()), sort=False)
    record = run_schedule(ids, dict.fromkeys(ids, 1), config, replay_executor(lengths))
    return static_run_seconds(record, costs, prompt_tokens)


def costs_from_json(name: str, entry: Mapping) -> DeviceCosts:
    """A cost model from its JSON (DeviceCosts.to_json's fields)."""
    base = {int(rows): seconds for rows, seconds in entry["base_seconds_per_step"].items()}
    # a profile of a device measured elsewhere names no memory limit; a measured one records its own
    limits = {key: entry[key] for key in ("largest_batch", "kv_token_budget") if entry.get(key) is not None}
    steps = StepCosts(base, entry["per_context_token_seconds"], entry["context"], **limits)
    return DeviceCosts(steps, entry["prefill_seconds_per_token"], name, entry["source"])


def load_profiles(path: Path = PROFILES_FILE) -> dict[str, DeviceCosts]:
    """The named devices' cost models, by name."""
    return {name: costs_from_json(name, entry) for name, entry in json.loads(path.read_text()).items()}
