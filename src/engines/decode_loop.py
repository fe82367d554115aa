"""The static-cache engine's own decode loop: a batch's prompts prefilled into a `DecodeSlot`, then decode steps that
each choose every row's next token in place, on tensors at fixed addresses, so that a step can be compiled into one
function or captured into one CUDA graph (src.engines.decode_steps) and replayed back to back.

Why not transformers' `generate`: it runs its logits processors and stopping criteria as separate kernels around the
forward pass and, on CUDA, waits for the device at every step to learn whether every row has finished, so the host
cannot queue the next step while the device runs this one (docs/GPU.md measures what that costs). Here the host asks
only every `CHECK_EVERY` steps, and never when every row's length is replayed, since the step count is then known.

The loop decodes greedily, with replayed lengths where asked, as `generate` under the replay processor does (tested
token for token on the CPU in float32); the engine sends sampling, and models whose generation config adds logits
processors, to `generate` on the same static cache.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .generate import (
    StepClock,
    check_kept_caches,
    fill_static_cache,
    left_pad,
    plain_layers,
    replay_scores,
    sampling_arguments,
)

# Decode steps between the host's looks at whether every row has finished (when some length is not replayed): each
# look waits for the device, and a batch may run up to this many steps past its last row's end, all of them padding.
CHECK_EVERY = 8


@dataclass(frozen=True)
class DecodeSlot:
    """What one (rows B, cache length L) shape keeps between batches, every tensor at a fixed address so that a
    compiled or captured step replays on it; the step changes them in place."""

    cache: object  # transformers' StaticCache: keys and values [B, H, L, D] per layer
    tokens: torch.Tensor  # [B, 1] the last chosen token: the next step's input
    positions: torch.Tensor  # [B, 1] its position (a row's left padding not counted)
    attention_mask: torch.Tensor  # [B, L] 0 over each row's left padding
    targets: torch.Tensor  # [B] replayed lengths; 0: free
    step: torch.Tensor  # [] the number of the last chosen token (1 after the prefill)
    finished: torch.Tensor  # [B] bool: emitted EOS
    generated: torch.Tensor  # [B, L] column t - 1 holds token number t
    # a step's CUDA graphs, captured on this slot's tensors: they live and are dropped with it (a graph replayed on a
    # dropped slot's memory would write into whatever holds it now)
    graphs: list = field(default_factory=list, compare=False)

    @classmethod
    def allocate(cls, model, rows: int, length: int) -> DecodeSlot:
        from transformers import StaticCache

        def zeros(*shape, dtype=torch.long):
            tensor = torch.zeros(shape, dtype=dtype, device=model.device)
            torch._dynamo.mark_static_address(tensor)  # mutated in place inside the graph, as the cache is
            return tensor

        return cls(
            cache=StaticCache(config=model.config, max_cache_len=length),
            tokens=zeros(rows, 1),
            positions=zeros(rows, 1),
            attention_mask=zeros(rows, length),
            targets=zeros(rows),
            step=zeros(),
            finished=zeros(rows, dtype=torch.bool),
            generated=zeros(rows, length),
        )


@dataclass(frozen=True)
class EndTokens:
    """The vocabulary's end tokens as a step reads them: `eos_mask` [1, V] True at the EOS ids, `forced_end` [1, V]
    scores that allow only the first EOS (a replayed row's last token), `pad_token_id` what a finished row emits."""

    eos_mask: torch.Tensor
    forced_end: torch.Tensor
    pad_token_id: int

    @classmethod
    def of(cls, eos_token_ids: list[int], vocabulary: int, device, pad_token_id: int) -> EndTokens:
        eos_mask = torch.zeros((1, vocabulary), dtype=torch.bool, device=device)
        eos_mask[0, eos_token_ids] = True
        forced_end = torch.full((1, vocabulary), -float("inf"), device=device)
        forced_end[0, eos_token_ids[0]] = 0.0
        for tensor in (eos_mask, forced_end):
            torch._dynamo.mark_static_address(tensor)  # read inside compiled steps and captured graphs
        return cls(eos_mask, forced_end, pad_token_id)


def loop_decodes(model) -> bool:
    """The loop applies the replayed lengths and the greedy choice only: a model whose generation config adds logits
    processors (a repetition penalty, a minimum length, ...) or whose static cache has other layers than full ones (a
    sliding window) is decoded by `generate` instead."""
    from transformers import StaticCache

    greedy = copy.deepcopy(model.generation_config)
    greedy.update(**sampling_arguments(0.0))
    processors = model._get_logits_processor(greedy, device=model.device)
    return not processors and plain_layers(StaticCache(config=model.config, max_cache_len=1))


def choose_next_tokens(logits: torch.Tensor, slot: DecodeSlot, end: EndTokens) -> None:
    """Token number step + 1 of every row from its `logits` ([B, V]), as `generate` chooses it under the replay
    processor: EOS forbidden before a row's replayed length and forced at it, the greedy choice, then padding for rows
    already finished."""
    slot.step.add_(1)
    scores = replay_scores(logits.float(), slot.targets, slot.step, end.eos_mask, end.forced_end)  # [B, V]
    chosen = torch.argmax(scores, dim=-1)  # [B]
    chosen = torch.where(slot.finished, end.pad_token_id, chosen)
    slot.finished.logical_or_(end.eos_mask[0, chosen])
    slot.generated.index_copy_(1, slot.step.view(1) - 1, chosen.unsqueeze(1))
    slot.tokens.copy_(chosen.unsqueeze(1))


def decode_one_token(model, slot: DecodeSlot, end: EndTokens) -> None:
    """One decode step on the slot, in place: the unit a step part runs eagerly, compiles or captures."""
    logits = model(
        input_ids=slot.tokens,
        position_ids=slot.positions,
        attention_mask=slot.attention_mask,
        past_key_values=slot.cache,
        use_cache=True,
    ).logits[:, -1]  # [B, V]
    choose_next_tokens(logits, slot, end)
    slot.positions.add_(1)


def prefill_slot(
    model, slot: DecodeSlot, prompts, pad_token_id: int, replay_lengths, prefix_caches, end_tokens_of
) -> torch.Tensor:
    """Every row's prompt into the reset slot and its first token chosen; returns the left-padded prompts ([B, W]).
    Rows with a kept cache (`prefix_caches`, over all but their last token) compute only their last token.
    `end_tokens_of(vocabulary)` gives the `EndTokens` for the logits' vocabulary."""
    input_ids, attention_mask = left_pad(prompts, pad_token_id, model.device)  # [B, W]
    width = input_ids.shape[1]
    slot.cache.reset()
    slot.attention_mask.fill_(1)
    slot.attention_mask[:, :width].copy_(attention_mask)
    targets = [0 if length is None else max(1, int(length)) for length in replay_lengths or [None] * len(prompts)]
    slot.targets.copy_(torch.tensor(targets, device=slot.targets.device))
    slot.step.zero_()
    slot.finished.zero_()
    # generate's positions: each row counts from its first real token (its padding's are masked out)
    position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)  # [B, W]
    first = 0
    if prefix_caches is not None:  # the kept caches cover all but each row's last token
        check_kept_caches(prompts, prefix_caches)
        fill_static_cache(slot.cache, prefix_caches, width)
        first = width - 1
    logits = model(
        input_ids=input_ids[:, first:],
        position_ids=position_ids[:, first:],
        attention_mask=slot.attention_mask,
        past_key_values=slot.cache,
        use_cache=True,
        logits_to_keep=1,
    ).logits[:, -1]  # [B, V]
    choose_next_tokens(logits, slot, end_tokens_of(logits.shape[-1]))
    slot.positions.copy_(position_ids[:, -1:] + 1)
    return input_ids


def decode_steps(
    run_step: Callable[[DecodeSlot], None],
    slot: DecodeSlot,
    steps: int,
    look_for_the_end: bool,
    clock: StepClock | None,
) -> int:
    """Up to `steps` decode steps queued back to back; with `look_for_the_end`, every CHECK_EVERY steps the host
    waits for the device and stops once every row has finished. Returns the steps run."""
    for done in range(steps):
        if look_for_the_end and done % CHECK_EVERY == 0 and bool(slot.finished.all()):
            return done
        run_step(slot)
        if clock is not None:
            clock.mark_step()
    return steps
