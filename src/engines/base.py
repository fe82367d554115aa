"""The engine contract: everything the rest of the project asks of an engine, and its defaults.

The scheduler never touches a model. `src.running` hands an engine static batches of token ids (with a cap and,
optionally, replayed lengths) or a queue for continuous batching; the generative length predictors, `src.lenpred` and
the VBS calibration use the same methods. `Engine` lists every member those callers use, and `EngineBase` gives each
optional one its default, so that no caller probes an engine for what it has: a new engine subclasses `EngineBase`,
writes `generate` (and, where it has them, continuous batching and a kept KV cache per row), and names itself in
`src.engines.registry.ENGINE_CLASSES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ..common.utils import UserError

# How continuous batching's step runs (`speed`, --continuous-speed). plain: the manager's defaults for the attention
# the model was loaded with (no CUDA graphs with sdpa, whose mask they would pad); graphs: CUDA graphs and asynchronous
# batching forced on, and flash attention (with the manager's block-table decode path) where its package is
# installed; compiled: graphs plus torch.compile of the step (the manager's compile level 1), at the cost of a
# compilation. Graphs exist on CUDA only: elsewhere graphs runs as plain.
CONTINUOUS_SPEEDS = ("graphs", "plain", "compiled")
DEFAULT_CONTINUOUS_SPEED = "graphs"

if TYPE_CHECKING:
    from .generate import BatchTiming, GeneratedSample


@dataclass(frozen=True)
class QueueResult:
    """One request's answer, told by continuous batching (`run_queue`'s `on_result`) as soon as it ends."""

    id: str
    length: int  # generated tokens, EOS included
    finished: bool  # ended by EOS (or at its replayed length) within max_length
    text: str
    seconds: float  # since the first request was queued
    done: int  # requests answered so far, this one included


@dataclass(frozen=True)
class ContinuousOutcome:
    """What continuous batching returns (`run_queue`): every request's result by id."""

    lengths: dict[str, int]  # generated tokens, EOS included
    finished: dict[str, bool]  # ended by EOS (or at its replayed length) within max_length
    texts: dict[str, str]
    finish_seconds: dict[str, float]  # since the first request was queued
    warmup_s: float = 0.0  # setting the engine up (its cache, and CUDA graphs on a GPU) before the first request
    settings: dict | None = None  # what the manager resolved: attention, graphs, asynchronous batching, compilation


class Engine(Protocol):
    name: str  # its --engine name, recorded in every result
    model: object
    tokenizer: object
    device: str
    # generate() takes each row's KV cache over all its prompt but the last token (`prefix_caches`) and, with
    # `keep_caches`, returns each unfinished row's cache (`GeneratedSample.kv_cache`): +resume then continues a
    # failure from its cache instead of prefilling it again
    keeps_kv_caches: bool
    last_timing: BatchTiming | None  # where the last generate() call's time went; None: not measured
    warmup_seconds: float  # one-off costs paid inside calls so far (compiling new shapes), kept out of every throughput

    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        temperature: float = 0.0,
        replay_lengths: list[int] | None = None,
        prefix_caches: list[tuple] | None = None,
        keep_caches: bool = False,
        top_p: float = 1.0,
    ) -> list[GeneratedSample]:
        """One static batch: every row runs until all finished or `max_new_tokens`; results in prompt order."""

    def run_queue(
        self,
        order: list[str],
        prompt_ids: dict[str, list[int]],
        max_length: int,
        slots: int,
        temperature: float = 0.0,
        replay: dict[str, int] | None = None,
        on_result: Callable[[QueueResult], None] | None = None,
        seed: int | None = None,
        speed: str = DEFAULT_CONTINUOUS_SPEED,
        top_p: float = 1.0,
        stops: dict[str, tuple[str, ...]] | None = None,
    ) -> ContinuousOutcome:
        """Continuous batching: requests admitted in `order`, at most `slots` at once, the step's settings chosen by
        `speed` (CONTINUOUS_SPEEDS above); `on_result` is told each answer as it ends. `stops`: request id -> its
        stop strings; an engine may end a row once its text holds one (the caller cuts every text there anyway)."""

    def decode_step_seconds(self, batch_size: int, context: int) -> float:
        """The time of one decode step of `batch_size` sequences at a `context`-token cache (VBS auto)."""


class EngineBase:
    """The defaults of the contract: no kept caches, no timing, no warm-up; continuous batching and step timing
    refused as a user's mistake naming the engine. Subclasses set `name` and write `generate`."""

    name = "base"
    keeps_kv_caches = False

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.device = str(model.device)
        self.last_timing: BatchTiming | None = None
        self.warmup_seconds = 0.0

    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        temperature: float = 0.0,
        replay_lengths: list[int] | None = None,
        prefix_caches: list[tuple] | None = None,
        keep_caches: bool = False,
        top_p: float = 1.0,
    ) -> list[GeneratedSample]:
        raise NotImplementedError(f"engine {self.name} does not generate")

    def run_queue(
        self,
        order,
        prompt_ids,
        max_length,
        slots,
        temperature=0.0,
        replay=None,
        on_result=None,
        seed=None,
        speed=DEFAULT_CONTINUOUS_SPEED,
        top_p=1.0,
        stops=None,
    ):
        raise UserError(f"engine {self.name} has no continuous batching: run static strategies with it")

    def decode_step_seconds(self, batch_size: int, context: int) -> float:
        raise UserError(f"engine {self.name} cannot time decode steps: pass --vbs-table as a table")

    def check_cache_arguments(self, prefix_caches, keep_caches) -> None:
        """For an engine without per-row caches: a caller that passes them broke the contract."""
        if not self.keeps_kv_caches and (prefix_caches is not None or keep_caches):
            raise ValueError(f"engine {self.name} keeps no per-row KV caches (keeps_kv_caches is False)")
