"""Planning batches, as pure Python over lengths: the 50-token buckets, the VBS table, the first batches of a group
and the FCR retries of its failures. Every decision is plain data (`Batch`), made from lengths alone."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

# Predictions and VBS work in 50-token buckets: the paper found exact lengths too noisy to learn and
# 50 tokens fine enough that a batch's cap wastes little (its Acc-50 metric uses the same cell).
BUCKET_CELL = 50

# The paper's variable batch size: bucket (tokens) -> batch size, tuned for Vicuna-7B on an A100.
# Short buckets fit many more sequences in memory, so they get larger batches.
PAPER_VBS_TABLE: Mapping[int, int] = {50: 256, 100: 128, 150: 64, 200: 32, 250: 16, 300: 16}
# Batch size of buckets the table does not list, and the smallest last batch that a bucket keeps:
# a smaller remainder moves up into the next bucket, where it fills a batch instead of running alone.
VBS_DEFAULT_BATCH_SIZE = 16
# +resume retries its failures at these upper quantiles of their predicted lengths, one retry each, before the
# last retry at max_length; chosen on 1000 held-out train rows (docs/RESUME.md)
RESUME_RETRY_QUANTILES = (0.8, 0.95)


def bucket_of(length: int, cell: int = BUCKET_CELL) -> int:
    """Round a length up to a multiple of `cell` (the paper's 50-token buckets): 1..50 -> 50, 51 -> 100."""
    return max(1, -(-int(length) // cell)) * cell


def parse_vbs_table(text: str) -> dict[int, int]:
    """`50:256,100:128` -> {50: 256, 100: 128}; raises ValueError on anything else."""
    table = {}
    for item in text.split(","):
        bucket, _, size = item.strip().partition(":")
        bucket_value, size_value = int(bucket), int(size)
        if bucket_value < 1 or size_value < 1 or bucket_value % BUCKET_CELL:
            raise ValueError(f"bad VBS entry {item!r}: buckets are positive multiples of {BUCKET_CELL}")
        table[bucket_value] = size_value
    return table


@dataclass(frozen=True)
class ScheduleConfig:
    batch_size: int = 16
    group_size: int = 256
    max_length: int = 512
    sort: bool = True  # False keeps the data order (vanilla)
    vbs: bool = False
    fcr: bool = False
    # FCR failures keep the tokens they generated and continue from them (from their kept KV cache where the
    # executor has one, else prefilling prompt and tokens again) instead of starting over as the paper's FCR does
    resume: bool = False
    vbs_table: Mapping[int, int] = field(default_factory=lambda: dict(PAPER_VBS_TABLE))
    vbs_default_batch_size: int = VBS_DEFAULT_BATCH_SIZE

    def __post_init__(self):
        for name in ("batch_size", "group_size", "max_length", "vbs_default_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")

    def vbs_batch_size(self, bucket: int) -> int:
        return self.vbs_table.get(bucket, self.vbs_default_batch_size)


@dataclass(frozen=True)
class Batch:
    ids: tuple[str, ...]
    max_new_tokens: int  # the batch stops when all members finish or at this cap
    group: int
    recompute: bool = False  # an FCR retry (any attempt after the first)
    bucket: int | None = None  # the VBS bucket the batch was cut from
    # tokens each member (in `ids` order) already generated and continues from; None: every member starts afresh.
    # `max_new_tokens` counts the tokens generated in this batch.
    resume_from: tuple[int, ...] | None = None
    attempt: int = 0  # 0: the first attempt, 1: the first FCR retry, ...
    # +resume: a member that stops unfinished with fewer tokens in all than this continues in a later batch, so an
    # executor that can keeps what lets it continue cheaply (its KV cache); None: no member continues
    resume_below: int | None = None
    # a resumed batch runs as far as its least advanced member may, so a member further on can pass max_length: its
    # tokens past this limit (in all) are cut, as the scheduler counts them; None: no member is resumed
    length_limit: int | None = None


def clamp_prediction(value: int | float, max_length: int) -> int:
    """Every prediction lies in [1, max_length]: a cap beyond max_length is never allowed."""
    return min(max(int(round(value)), 1), max_length)


def _chunks(items: list[str], size: int) -> list[list[str]]:
    return [items[start : start + size] for start in range(0, len(items), size)]


def plan_first_batches(
    ids: list[str],
    predictions: Mapping[str, int],
    config: ScheduleConfig,
    group: int = 0,
    caps: Mapping[str, int] | None = None,
) -> list[Batch]:
    """Batches for one group's first attempt.

    Sorted (stable) by prediction unless `config.sort` is off; cut into `batch_size` batches, or with VBS
    into per-bucket batches whose sizes follow the table. Under FCR a batch's cap is its largest prediction
    (its bucket with VBS), or, where `caps` gives each sample its own cap (an upper quantile of its
    length), the largest cap of its members; without FCR every batch may run to `max_length`.
    """
    if not ids:
        return []
    ordered = sorted(ids, key=lambda sample_id: predictions[sample_id]) if (config.sort or config.vbs) else list(ids)
    batches: list[Batch] = []
    if not config.vbs:
        for members in _chunks(ordered, config.batch_size):
            cap = max((caps or predictions)[sample_id] for sample_id in members) if config.fcr else config.max_length
            cap = min(cap, config.max_length)
            batches.append(Batch(tuple(members), cap, group, resume_below=_resume_below(config)))
        return batches

    by_bucket: dict[int, list[str]] = {}
    for sample_id in ordered:
        by_bucket.setdefault(bucket_of(predictions[sample_id]), []).append(sample_id)
    largest_prediction = max(predictions[sample_id] for sample_id in ids)
    carried: list[str] = []
    for bucket in sorted(by_bucket):
        members = by_bucket[bucket] + carried  # carried samples join after the bucket's own, as upstream
        carried = []
        size = config.vbs_batch_size(bucket)
        pieces = _chunks(members, size)
        smallest_kept = max(size // 2, config.vbs_default_batch_size)
        if bucket < largest_prediction and len(pieces[-1]) < smallest_kept:
            carried = pieces.pop()  # too small to run alone: it moves up into the next non-empty bucket
        for piece in pieces:
            cap = config.max_length
            if config.fcr:
                cap = min(bucket if caps is None else max(caps[sample_id] for sample_id in piece), config.max_length)
            batches.append(Batch(tuple(piece), cap, group, bucket=bucket, resume_below=_resume_below(config)))
    return batches


def _resume_below(config: ScheduleConfig) -> int | None:
    """Under FCR's +resume a failure (unfinished short of max_length) continues in a later batch."""
    return config.max_length if config.fcr and config.resume else None


def plan_recompute(
    failed_ids: list[str],
    config: ScheduleConfig,
    group: int = 0,
    known_above: Mapping[str, int] | None = None,
    caps: Mapping[str, int] | None = None,
    attempt: int = 1,
) -> list[Batch]:
    """An FCR retry of a group's failures. `known_above[id]`: the length the sample is known to exceed (where its
    last attempt stopped). Without `caps` (the paper's FCR, and every last retry) each batch may run to max_length;
    with `caps` (an upper quantile of each length) a sample's cap is that quantile, but at least one bucket beyond
    what it is known to exceed, since a cap below that only repeats the failure. Under `config.resume` a sample
    continues from the tokens it has and its cap counts the tokens still to make. Failures are sorted (stably, so
    the paper's retry keeps the order their first batches ran) by those remaining tokens, so that a batch holds
    samples that need about as many."""
    known_above = known_above or {}
    progress = {sample_id: known_above.get(sample_id, 0) if config.resume else 0 for sample_id in failed_ids}
    remaining = {}
    for sample_id in failed_ids:
        cap = config.max_length
        if caps is not None:
            cap = min(max(caps[sample_id], known_above.get(sample_id, 0) + BUCKET_CELL), config.max_length)
        remaining[sample_id] = cap - progress[sample_id]
    ordered = sorted(failed_ids, key=lambda sample_id: remaining[sample_id])
    return [
        Batch(
            tuple(members),
            max(remaining[sample_id] for sample_id in members),
            group,
            recompute=True,
            resume_from=tuple(progress[sample_id] for sample_id in members) if config.resume else None,
            length_limit=config.max_length if config.resume else None,
            attempt=attempt,
            # the last retry, at max_length, is final
            resume_below=config.max_length if config.resume and caps is not None else None,
        )
        for members in _chunks(ordered, config.batch_size)
    ]
