"""Continuous batching on transformers' engine (`ContinuousBatchingManager`), for comparison with the
paper's static batches: a finished sequence's slot takes the next queued request at the next iteration.

We only choose the admission order, the slot budget and how fast the engine's step runs; the engine does the rest.
Its defaults size the KV cache from free memory (0.9 of it: about 19 GB of RAM on a CPU), so the cache here is sized
from the requests.

Its defaults also leave its step slow on a GPU with the attention the static engines use (sdpa): an attention mask is
then needed, so the manager turns its CUDA graphs and asynchronous batching off, and each iteration pays every kernel
launch from the host (docs/GPU.md measures it against a compiled static step). `CONTINUOUS_SPEEDS` name the settings a
run asks for; the resolved ones come back in `ContinuousOutcome.settings`, so that a result says what ran.
"""

from __future__ import annotations

import importlib.util
import math
import time
from collections.abc import Callable

import torch
from transformers import ContinuousBatchingConfig, GenerationConfig

from .base import CONTINUOUS_SPEEDS, DEFAULT_CONTINUOUS_SPEED, ContinuousOutcome, QueueResult
from .generate import eos_token_ids_of, sampling_arguments

# Tokens per KV-cache page: small pages waste little memory on short requests, at a few more page lookups.
PAGE_SIZE = 64
# Without EOS the engine stops a request only at its max_new_tokens: that is how a replayed length ends.
NO_EOS = -1


def flash_attention_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None and importlib.util.find_spec("kernels") is None


def continuous_config(
    prompt_lengths: list[int], max_length: int, slots: int, speed: str = DEFAULT_CONTINUOUS_SPEED, on_cuda: bool = False
) -> ContinuousBatchingConfig:
    """A cache that holds `slots` of the longest requests at once, no more concurrent requests than that, and the
    step settings of `speed` (CONTINUOUS_SPEEDS)."""
    if speed not in CONTINUOUS_SPEEDS:
        raise ValueError(f"unknown continuous speed {speed!r}: choose from {', '.join(CONTINUOUS_SPEEDS)}")
    pages_per_request = math.ceil((max(prompt_lengths) + max_length) / PAGE_SIZE)
    fast = speed != "plain"
    return ContinuousBatchingConfig(
        page_size=PAGE_SIZE,
        num_blocks=slots * pages_per_request + 1,
        max_batch_tokens=max(slots, max(prompt_lengths)) + slots,
        max_requests_per_batch=slots,
        allow_block_sharing=False,  # prompts share only the chat template's prefix; sharing would change the work
        # flash attention needs no mask and gives the manager its block-table decode path; plain keeps the model's.
        # Only where its package is installed and the `kernels` package is not: the manager prefers a kernel from
        # the hub when it can, and these machines reach no hub
        auto_switch_to_flash=fast and flash_attention_installed(),
        scheduler_type="fifo",  # admission follows the order requests are queued in
        use_cuda_graph=True if fast and on_cuda else None,  # None: the manager decides (off where a mask is needed)
        use_async_batching=True if fast and on_cuda else None,
        default_compile_level=1 if speed == "compiled" else 0,
    )


def resolved_settings(manager, speed: str) -> dict:
    """The settings the manager runs with, once it has resolved its configuration."""
    config = manager.continuous_batching_config
    graphs = config.use_cuda_graph

    def mode(compile_config):
        return None if compile_config is None else compile_config.mode

    return {
        "speed": speed,
        "attention": manager.model.config._attn_implementation,
        "cuda_graphs_varlen_decode": list(graphs) if isinstance(graphs, tuple) else graphs,
        "async_batching": config.use_async_batching,
        "compile_varlen": mode(config.varlen_compile_config),
        "compile_decode": mode(config.decode_compile_config),
        "block_table_decode": bool(config.max_blocks_per_request),
    }


def queue_requests(
    manager, order: list[str], prompt_ids: dict[str, list[int]], max_length: int, replay: dict[str, int] | None
) -> None:
    """Queue every request in `order`, the order the engine admits them in."""
    for sample_id in order:
        if replay is not None:
            manager.add_request(
                prompt_ids[sample_id],
                request_id=sample_id,
                max_new_tokens=min(max(1, replay[sample_id]), max_length),
                eos_token_id=NO_EOS,
            )
        else:
            manager.add_request(prompt_ids[sample_id], request_id=sample_id, max_new_tokens=max_length)


def wait_for_results(manager, count: int, on_result: Callable[[object, int], None] | None) -> dict:
    """Every one of the `count` queued requests' finished result, by request id; `on_result(result, done)` after
    each."""
    results = {}
    while len(results) < count:
        result = manager.get_result(timeout=1)
        if result is None:
            if not manager.is_running():
                raise RuntimeError(f"continuous batching stopped after {len(results)} of {count} requests")
            continue
        if not result.is_finished():
            continue
        if result.error is not None:
            raise RuntimeError(f"continuous batching failed on id {result.request_id}: {result.error}")
        results[result.request_id] = result
        if on_result:
            on_result(result, len(results))
    return results


def queue_result(result, done: int, start: float, tokenizer, eos_token_ids, replay, max_length) -> QueueResult:
    """The manager's finished `result` as the engine contract tells it: a replayed request ends at its length (the
    manager ran it without EOS), any other at EOS."""
    tokens = list(result.generated_tokens)
    if replay is not None:
        finished = replay[result.request_id] <= max_length
    else:
        finished = bool(tokens) and tokens[-1] in eos_token_ids
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    return QueueResult(result.request_id, len(tokens), finished, text, result.lifespan[1] - start, done)


# no_grad, never inference_mode: the engine's worker thread updates its static tensors outside inference mode,
# and on CUDA (where its warm-up runs) tensors made under inference mode here made it fail with "Inplace update to
# inference tensor outside InferenceMode is not allowed". The engine's own steps run under no_grad.
@torch.no_grad()
def run_continuous(
    model,
    tokenizer,
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
) -> ContinuousOutcome:
    """Queue every request in `order`, let the engine run them with at most `slots` at a time and its step at
    `speed`, and collect each one's length, text and finish time."""
    eos_token_ids = eos_token_ids_of(model, tokenizer)
    sampling = sampling_arguments(temperature, top_p)
    generation_config = GenerationConfig(
        max_new_tokens=max_length,
        eos_token_id=eos_token_ids,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=sampling["do_sample"],
        temperature=sampling["temperature"],
        top_k=sampling["top_k"],
        top_p=sampling["top_p"],
    )
    on_cuda = model.device.type == "cuda"
    config = continuous_config([len(prompt_ids[sample_id]) for sample_id in order], max_length, slots, speed, on_cuda)
    if seed is not None:
        config.seed = seed
    setup_start = time.perf_counter()
    with model.continuous_batching_context_manager(
        generation_config=generation_config,
        continuous_batching_config=config,
        block=True,
        timeout=30,
        warmup=on_cuda,  # warm-up captures CUDA graphs; elsewhere it only costs time
    ) as manager:
        start = time.perf_counter()
        warmup = start - setup_start
        queue_requests(manager, order, prompt_ids, max_length, replay)

        def describe(result, done: int) -> QueueResult:
            return queue_result(result, done, start, tokenizer, eos_token_ids, replay, max_length)

        told = (lambda result, done: on_result(describe(result, done))) if on_result else None
        results = wait_for_results(manager, len(order), told)
        settings = resolved_settings(manager, speed)
    answers = [describe(results[sample_id], done) for done, sample_id in enumerate(order, start=1)]
    lengths = {answer.id: answer.length for answer in answers}
    finished = {answer.id: answer.finished for answer in answers}
    texts = {answer.id: answer.text for answer in answers}
    finish_seconds = {answer.id: answer.seconds for answer in answers}
    return ContinuousOutcome(lengths, finished, texts, finish_seconds, warmup, settings)
