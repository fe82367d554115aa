"""The `graph` engine: the compiled engine's bounded shapes and kept static caches, decoded by its own loop instead of
transformers' `generate`, so that a whole decode step (the forward pass, replayed lengths and EOS, the greedy choice,
the token's record) is one compiled function: on CUDA one CUDA graph per shape, replayed back to back.

Why: on an H200 the compiled engine's step of 16 rows of the 7B shape took 9.0 ms, against a floor of about 4 ms
(the weights and the cache read once). `generate` runs its logits processors and stopping criteria as separate
kernels around the captured forward pass and, on CUDA, waits for the device at every step to learn whether every row
has finished, so the host cannot queue the next step while the device runs this one. Here the host asks only every
`CHECK_EVERY` steps, and never when every row's length is replayed, since the step count is then known.

Greedy and replayed decoding run here, with the eager engine's tokens (tested on the CPU in float32). Sampling
(temperature > 0) runs through the compiled engine's `generate`, whose draws match the eager engine's under one seed;
inside a compiled graph they would come from another random stream.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from .compiled import CompiledEngine
from .generate import (
    GeneratedSample,
    StepClock,
    check_kept_caches,
    fill_static_cache,
    left_pad,
    plain_layers,
    replay_scores,
    samples_from_output,
    sampling_arguments,
)

# Decode steps between the host's looks at whether every row has finished (when some length is not replayed): each
# look waits for the device, and a batch may run up to this many steps past its last row's end, all of them padding.
CHECK_EVERY = 8


@dataclass(frozen=True)
class DecodeSlot:
    """What one (rows B, cache length L) shape keeps between batches, every tensor at a fixed address so that its CUDA
    graph replays on it; the step changes them in place."""

    cache: object  # transformers' StaticCache: keys and values [B, H, L, D] per layer
    tokens: torch.Tensor  # [B, 1] the last chosen token: the next step's input
    positions: torch.Tensor  # [B, 1] its position (a row's left padding not counted)
    attention_mask: torch.Tensor  # [B, L] 0 over each row's left padding
    targets: torch.Tensor  # [B] replayed lengths; 0: free
    step: torch.Tensor  # [] the number of the last chosen token (1 after the prefill)
    finished: torch.Tensor  # [B] bool: emitted EOS
    generated: torch.Tensor  # [B, L] column t - 1 holds token number t

    @classmethod
    def allocate(cls, cache, rows: int, length: int, device) -> DecodeSlot:
        def zeros(*shape, dtype=torch.long):
            tensor = torch.zeros(shape, dtype=dtype, device=device)
            torch._dynamo.mark_static_address(tensor)  # mutated in place inside the graph, as the cache is
            return tensor

        return cls(
            cache=cache,
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
    """The vocabulary's end tokens as the step reads them: `eos_mask` [1, V] True at the EOS ids, `forced_end` [1, V]
    scores that allow only the first EOS (a replayed row's last token), `pad_token_id` what a finished row emits."""

    eos_mask: torch.Tensor
    forced_end: torch.Tensor
    pad_token_id: int


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
    """One decode step on the slot, in place: the compiled (on CUDA, graph-captured) unit."""
    logits = model(
        input_ids=slot.tokens,
        position_ids=slot.positions,
        attention_mask=slot.attention_mask,
        past_key_values=slot.cache,
        use_cache=True,
    ).logits[:, -1]  # [B, V]
    choose_next_tokens(logits, slot, end)
    slot.positions.add_(1)


class GraphEngine(CompiledEngine):
    name = "graph"
    slot_class = DecodeSlot  # what `_new_cache` allocates per shape

    def __init__(self, model, tokenizer):
        super().__init__(model, tokenizer)
        self.compiled_step = self._compile_decode_step()
        self.end_tokens: EndTokens | None = None  # built once, at the first prefill, from its logits' vocabulary
        self.decodes_itself = self._loop_gives_generates_tokens()

    def _compile_decode_step(self):
        """`decode_one_token` compiled once for every shape; on CUDA, torch.compile records each shape's CUDA graph."""
        on_cuda = self.model.device.type == "cuda"
        mode = "reduce-overhead" if on_cuda else "default"
        return torch.compile(decode_one_token, mode=mode, dynamic=True, fullgraph=True)

    def _run_decode_step(self, slot: DecodeSlot) -> None:
        torch.compiler.cudagraph_mark_step_begin()  # the previous replay's outputs are no longer read
        self.compiled_step(self.model, slot, self.end_tokens)

    def _loop_gives_generates_tokens(self) -> bool:
        """The loop applies the replayed lengths and the greedy choice only: a model whose generation config adds
        logits processors (a repetition penalty, a minimum length, ...) or whose static cache has other layers than
        full ones (a sliding window) decodes through the compiled engine's `generate` instead."""
        from transformers import StaticCache

        greedy = copy.deepcopy(self.model.generation_config)
        greedy.update(**sampling_arguments(0.0))
        processors = self.model._get_logits_processor(greedy, device=self.model.device)
        return not processors and plain_layers(StaticCache(config=self.model.config, max_cache_len=1))

    def _new_cache(self, rows: int, length: int) -> DecodeSlot:
        return self.slot_class.allocate(super()._new_cache(rows, length), rows, length, self.model.device)

    def _end_tokens(self, vocabulary: int) -> EndTokens:
        if self.end_tokens is None:
            device = self.model.device
            eos_mask = torch.zeros((1, vocabulary), dtype=torch.bool, device=device)
            eos_mask[0, self.eos_token_ids] = True
            forced_end = torch.full((1, vocabulary), -float("inf"), device=device)
            forced_end[0, self.eos_token_ids[0]] = 0.0
            for tensor in (eos_mask, forced_end):
                torch._dynamo.mark_static_address(tensor)
            self.end_tokens = EndTokens(eos_mask, forced_end, self.tokenizer.pad_token_id)
        return self.end_tokens

    def _prefill(self, slot: DecodeSlot, prompts, replay_lengths, prefix_caches) -> torch.Tensor:
        """Every row's prompt into the reset slot and its first token chosen; returns the left-padded prompts."""
        input_ids, attention_mask = left_pad(prompts, self.tokenizer.pad_token_id, self.model.device)  # [B, W]
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
        logits = self.model(
            input_ids=input_ids[:, first:],
            position_ids=position_ids[:, first:],
            attention_mask=slot.attention_mask,
            past_key_values=slot.cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]  # [B, V]
        choose_next_tokens(logits, slot, self._end_tokens(logits.shape[-1]))
        slot.positions.copy_(position_ids[:, -1:] + 1)
        return input_ids

    def _run(
        self,
        prompts,
        max_new_tokens,
        temperature,
        replay_lengths,
        slot: DecodeSlot,
        clock=None,
        top_p: float = 1.0,
        prefix_caches=None,
        keep_caches: bool = False,
    ) -> list[GeneratedSample]:
        if temperature > 0 or not self.decodes_itself:
            return super()._run(
                prompts, max_new_tokens, temperature, replay_lengths, slot.cache, clock, top_p, prefix_caches,
                keep_caches,
            )  # fmt: skip
        with torch.no_grad():
            input_ids = self._prefill(slot, prompts, replay_lengths, prefix_caches)
            if clock is not None:
                clock.mark_step()
            every_row_replayed = replay_lengths is not None and None not in replay_lengths
            steps = max_new_tokens - 1
            if every_row_replayed:  # every row ends at its replayed length: the step count is known
                steps = min(steps, max(max(1, int(length)) for length in replay_lengths) - 1)
            steps_run = self._decode(slot, steps, not every_row_replayed, clock)
            output = torch.cat([input_ids, slot.generated[:, : 1 + steps_run]], dim=1)  # [B, W + T]
            cache = slot.cache if keep_caches else None
            return samples_from_output(self.tokenizer, output, input_ids.shape[1], prompts, self.eos_token_ids, cache)

    def _decode(self, slot: DecodeSlot, steps: int, look_for_the_end: bool, clock: StepClock | None) -> int:
        """Up to `steps` decode steps queued back to back; with `look_for_the_end`, every CHECK_EVERY steps the host
        waits for the device and stops once every row has finished. Returns the steps run."""
        for done in range(steps):
            if look_for_the_end and done % CHECK_EVERY == 0 and bool(slot.finished.all()):
                return done
            self._run_decode_step(slot)
            if clock is not None:
                clock.mark_step()
        return steps
