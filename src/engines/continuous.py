"""Continuous batching on transformers' engine (`ContinuousBatchingManager`), for comparison with the
paper's static batches: a finished sequence's slot takes the next queued request at the next iteration.

We only choose the admission order and the slot budget; the engine does the rest. Its defaults size the KV
cache from free memory (0.9 of it: about 19 GB of RAM on a CPU), so the cache here is sized from the requests.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import ContinuousBatchingConfig, GenerationConfig

from .generate import eos_token_ids_of, sampling_arguments

# Tokens per KV-cache page: small pages waste little memory on short requests, at a few more page lookups.
PAGE_SIZE = 64
# Without EOS the engine stops a request only at its max_new_tokens: that is how a replayed length ends.
NO_EOS = -1


@dataclass(frozen=True)
class ContinuousOutcome:
    lengths: dict[str, int]  # generated tokens, EOS included
    finished: dict[str, bool]  # ended by EOS (or at its replayed length) within max_length
    texts: dict[str, str]
    finish_seconds: dict[str, float]  # since the first request was queued
    warmup_s: float = 0.0  # setting the engine up (its cache, and CUDA graphs on a GPU) before the first request


def continuous_config(prompt_lengths: list[int], max_length: int, slots: int) -> ContinuousBatchingConfig:
    """A cache that holds `slots` of the longest requests at once, and no more concurrent requests than that."""
    pages_per_request = math.ceil((max(prompt_lengths) + max_length) / PAGE_SIZE)
    return ContinuousBatchingConfig(
        page_size=PAGE_SIZE,
        num_blocks=slots * pages_per_request + 1,
        max_batch_tokens=max(slots, max(prompt_lengths)) + slots,
        max_requests_per_batch=slots,
        allow_block_sharing=False,  # prompts share only the chat template's prefix; sharing would change the work
        auto_switch_to_flash=False,  # keep the attention the model was loaded with
        scheduler_type="fifo",  # admission follows the order requests are queued in
    )


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


def wait_for_results(manager, count: int, on_result: Callable[[int], None] | None) -> dict:
    """Every one of the `count` queued requests' finished result, by request id; `on_result(done)` after each."""
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
            on_result(len(results))
    return results


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
    on_result: Callable[[int], None] | None = None,
    seed: int | None = None,
) -> ContinuousOutcome:
    """Queue every request in `order`, let the engine run them with at most `slots` at a time, and collect
    each one's length, text and finish time."""
    eos_token_ids = eos_token_ids_of(model, tokenizer)
    sampling = sampling_arguments(temperature)
    generation_config = GenerationConfig(
        max_new_tokens=max_length,
        eos_token_id=eos_token_ids,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=sampling["do_sample"],
        temperature=sampling["temperature"],
        top_k=sampling["top_k"],
        top_p=sampling["top_p"],
    )
    config = continuous_config([len(prompt_ids[sample_id]) for sample_id in order], max_length, slots)
    if seed is not None:
        config.seed = seed
    setup_start = time.perf_counter()
    with model.continuous_batching_context_manager(
        generation_config=generation_config,
        continuous_batching_config=config,
        block=True,
        timeout=30,
        warmup=model.device.type == "cuda",  # warm-up captures CUDA graphs; elsewhere it only costs time
    ) as manager:
        start = time.perf_counter()
        warmup = start - setup_start
        queue_requests(manager, order, prompt_ids, max_length, replay)
        results = wait_for_results(manager, len(order), on_result)
    lengths, finished, texts, finish_seconds = {}, {}, {}, {}
    for sample_id in order:
        result = results[sample_id]
        tokens = list(result.generated_tokens)
        lengths[sample_id] = len(tokens)
        if replay is not None:
            finished[sample_id] = replay[sample_id] <= max_length
        else:
            finished[sample_id] = bool(tokens) and tokens[-1] in eos_token_ids
        texts[sample_id] = tokenizer.decode(tokens, skip_special_tokens=True)
        finish_seconds[sample_id] = result.lifespan[1] - start
    return ContinuousOutcome(lengths, finished, texts, finish_seconds, warmup)
