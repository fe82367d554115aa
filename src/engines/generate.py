"""Batched generation on transformers' `generate`, with per-sample lengths and optional length replay."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, LogitsProcessorList


class ReplayLengthsProcessor(LogitsProcessor):
    """Makes row b end exactly at its recorded length: EOS is forbidden before step target[b] and forced
    at it. With it any model, even random weights, follows a real length distribution. A row whose target is
    None is left free (target 0 never matches a step)."""

    def __init__(self, target_lengths: list[int | None], eos_token_ids: list[int], prompt_length: int):
        self.target = torch.tensor([0 if length is None else max(1, int(length)) for length in target_lengths])  # [B]
        self.eos_token_ids = list(eos_token_ids)
        self.prompt_length = prompt_length
        self.eos_mask = None  # [1, V], True at the EOS ids; built on the first call, on the scores' device

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        # input_ids: [B, S + t], scores: [B, V]; the token chosen now is number t + 1.
        # Masks only, no data-dependent indexing: nothing here waits for the device.
        if self.eos_mask is None or self.eos_mask.shape[1] != scores.shape[1]:
            self.target = self.target.to(scores.device)
            self.eos_mask = torch.zeros((1, scores.shape[1]), dtype=torch.bool, device=scores.device)
            self.eos_mask[0, self.eos_token_ids] = True
            self.forced_end = torch.full_like(scores[:1], -float("inf"))  # [1, V]: only the first EOS allowed
            self.forced_end[0, self.eos_token_ids[0]] = 0.0
        step = input_ids.shape[1] - self.prompt_length + 1
        return replay_scores(scores, self.target, step, self.eos_mask, self.forced_end)


def replay_scores(scores, target, step, eos_mask, forced_end):
    """`scores` ([B, V]) of token number `step` (an int or a 0-d tensor) with EOS forbidden in every row whose
    `target` ([B]) is later and forced (only `forced_end`'s EOS allowed, [1, V]) in every row whose target is now;
    `eos_mask`: [1, V], True at the EOS ids."""
    too_early = (target > step).unsqueeze(1)  # [B, 1]
    end_now = (target == step).unsqueeze(1)  # [B, 1]
    scores = scores.masked_fill(too_early & eos_mask, -float("inf"))
    return torch.where(end_now, forced_end, scores)


@dataclass(frozen=True)
class BatchTiming:
    """Where one `generate` call's time went. `prefill_s`: from the call's start to the first token's logits (input
    preparation, cache set-up, the prompt's forward pass); `decode_s` over `decode_steps` further tokens; what the
    wall time holds besides (padding the prompts, copying and decoding the output) is `wall_s - prefill_s -
    decode_s`. `first_steps_ms` and `last_steps_ms`: the mean step over the first and the last tenth of the steps,
    which shows how a step's cost grows with the context."""

    wall_s: float
    prefill_s: float
    decode_s: float
    decode_steps: int
    first_steps_ms: float
    last_steps_ms: float


class StepClock(LogitsProcessor):
    """Marks the time of every decode step without waiting for the device: a CUDA event per step on a GPU (read
    once the batch is done), the host clock elsewhere. The first mark follows the prefill. It returns the scores
    unchanged, so it times the engine without altering what it generates."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []
        self.start = self._mark()

    def _mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def mark_step(self) -> None:
        """A decode step's token was chosen (queued, on a GPU)."""
        self.marks.append(self._mark())

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.mark_step()
        return scores

    def timing(self, wall_seconds: float) -> BatchTiming:
        """Call after the batch's results reached the host (the device is done with every marked step)."""
        if self.cuda:
            seconds = [self.start.elapsed_time(mark) / 1000 for mark in self.marks]
        else:
            seconds = [mark - self.start for mark in self.marks]
        steps = [later - earlier for earlier, later in zip(seconds, seconds[1:], strict=False)]
        tenth = max(1, len(steps) // 10)
        return BatchTiming(
            wall_s=wall_seconds,
            prefill_s=seconds[0] if seconds else 0.0,
            decode_s=sum(steps),
            decode_steps=len(steps),
            first_steps_ms=1000 * sum(steps[:tenth]) / tenth if steps else 0.0,
            last_steps_ms=1000 * sum(steps[-tenth:]) / tenth if steps else 0.0,
        )


@dataclass(frozen=True)
class GeneratedSample:
    length: int  # generated tokens up to and including EOS
    finished: bool  # emitted EOS within max_new_tokens
    text: str
    token_ids: list[int]
    # with keep_caches, an unfinished row's KV cache without its padding: per layer (keys, values), each [1, H, T, D]
    # over its prompt and every generated token but the last (whose KV the next step would compute)
    kv_cache: tuple | None = None


def kv_cache_bytes(kv_cache: tuple) -> int:
    return sum(tensor.numel() * tensor.element_size() for layer in kv_cache for tensor in layer)


def plain_layers(cache) -> bool:
    """A cache whose every layer keeps every position (no sliding window, no recurrent state) can be cut into rows
    and put together again: dynamic (eager) or static (compiled) full-attention layers."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer).__name__ in ("DynamicLayer", "StaticLayer") for layer in layers)


def _place_kept_rows(keys, values, prefix_caches: list[tuple], layer_index: int) -> None:
    """Each row's kept KV of one layer right-aligned over the positions of `keys` and `values` ([B, H, width - 1, D]
    views, zeros where the attention mask is 0): the layout of a batch of left-padded rows of `width` tokens whose
    every token but the last is cached."""
    width_minus_one = keys.shape[2]
    for row, kept in enumerate(prefix_caches):
        row_keys, row_values = kept[layer_index]  # [1, H, T, D]
        keys[row : row + 1, :, width_minus_one - row_keys.shape[2] :] = row_keys
        values[row : row + 1, :, width_minus_one - row_values.shape[2] :] = row_values


def _batch_cache(prefix_caches: list[tuple], width: int, config):
    """One DynamicCache (the eager engine's) for a batch of left-padded rows of `width` tokens from each row's kept KV
    (which covers all but its last token)."""
    from transformers import DynamicCache

    layers = []
    for index, (first_keys, first_values) in enumerate(prefix_caches[0]):
        rows, heads = len(prefix_caches), first_keys.shape[1]
        keys = first_keys.new_zeros((rows, heads, width - 1, first_keys.shape[3]))  # [B, H, width - 1, D]
        values = first_values.new_zeros((rows, heads, width - 1, first_values.shape[3]))
        _place_kept_rows(keys, values, prefix_caches, index)
        layers.append((keys, values))
    return DynamicCache(layers, config=config)


def check_kept_caches(prompts: list[list[int]], prefix_caches: list[tuple]) -> None:
    """Each row's kept cache covers all its prompt but the last token: anything else is a caller's bug."""
    for prompt, row in zip(prompts, prefix_caches, strict=True):
        if row[0][0].shape[2] != len(prompt) - 1:
            raise RuntimeError(f"a kept KV cache of {row[0][0].shape[2]} tokens for a prompt of {len(prompt)}")


def fill_static_cache(cache, prefix_caches: list[tuple], width: int) -> None:
    """A reset static cache (the compiled engine's) holding each row's kept KV as `_batch_cache` lays it out over its
    first width - 1 positions; its length set there, so that only each row's last prompt token is computed."""
    for index, layer in enumerate(cache.layers):
        _place_kept_rows(layer.keys[:, :, : width - 1], layer.values[:, :, : width - 1], prefix_caches, index)
        layer.cumulative_length.fill_(width - 1)


def eos_token_ids_of(model, tokenizer) -> list[int]:
    """All ids that end a response: the generation config's (a list for some chat models), else the tokenizer's."""
    configured = getattr(model.generation_config, "eos_token_id", None)
    if configured is None:
        configured = tokenizer.eos_token_id
    ids = configured if isinstance(configured, list) else [configured]
    return [int(token_id) for token_id in ids if token_id is not None]


def left_pad(prompts: list[list[int]], pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts end at the same column, so every row's next token is generated at the same position."""
    width = max(len(prompt) for prompt in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)  # [B, S]
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)  # [B, S]
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, width - len(prompt) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def sampling_arguments(temperature: float, top_p: float = 1.0) -> dict:
    """Greedy at temperature 0, as the paper; above it sampling from softmax(logits / T) within the nucleus `top_p`
    (1: plain sampling), with top-k off, so that a model's generation_config cannot change the distribution."""
    if temperature <= 0:
        return {"do_sample": False, "temperature": None, "top_k": None, "top_p": None}
    return {"do_sample": True, "temperature": float(temperature), "top_k": 0, "top_p": float(top_p)}


def samples_from_output(
    tokenizer, output: torch.Tensor, prompt_length: int, prompts: list[list[int]], eos_token_ids: list[int], cache
) -> list[GeneratedSample]:
    """Each row of `generate`'s output (output: [B, prompt_length + T], the prompts left-padded) cut after its first
    EOS, and given the batch's `cache` (None: keep none), each unfinished row's own KV cache."""
    new_tokens = output[:, prompt_length:].cpu()  # [B, T], T <= max_new_tokens
    is_eos = torch.isin(new_tokens, torch.tensor(eos_token_ids))  # [B, T]
    samples = []
    for row in range(new_tokens.shape[0]):
        eos_positions = is_eos[row].nonzero(as_tuple=True)[0]
        finished = len(eos_positions) > 0
        length = int(eos_positions[0]) + 1 if finished else new_tokens.shape[1]
        token_ids = new_tokens[row, :length].tolist()
        text = tokenizer.decode(token_ids, skip_special_tokens=True)
        kv_cache = None
        if cache is not None and not finished:  # it ran every step: its cache holds no padding after its tokens
            # over its prompt and every generated token but the last (a static cache is longer than that)
            start, end = prompt_length - len(prompts[row]), prompt_length + new_tokens.shape[1] - 1
            kv_cache = tuple(
                (layer.keys[row : row + 1, :, start:end].clone(), layer.values[row : row + 1, :, start:end].clone())
                for layer in cache.layers
            )
        samples.append(GeneratedSample(length, finished, text, token_ids, kv_cache))
    return samples


def generate_batch(
    model,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    replay_lengths: list[int | None] | None = None,
    eos_token_ids: list[int] | None = None,
    clock: StepClock | None = None,
    generate_options: dict | None = None,
    inference_mode: bool = True,
    prefix_caches: list[tuple] | None = None,
    keep_caches: bool = False,
    top_p: float = 1.0,
) -> list[GeneratedSample]:
    """Generate for a batch of tokenised prompts; the batch stops when every row finished or at the cap.
    `clock` times the steps; `generate_options` go to `generate` as they are (a static cache, a compile config);
    `inference_mode` off runs under no_grad, as transformers' compiled decoding expects. `prefix_caches`: every row's
    KV cache over all its prompt tokens but the last (a `kv_cache` kept earlier), so that only the last one is
    computed; `keep_caches` returns each unfinished row's cache in its `kv_cache`, where the model's cache allows."""
    with torch.inference_mode() if inference_mode else torch.no_grad():
        eos_token_ids = eos_token_ids or eos_token_ids_of(model, tokenizer)
        input_ids, attention_mask = left_pad(prompts, tokenizer.pad_token_id, model.device)
        prompt_length = input_ids.shape[1]
        options = dict(generate_options or {})
        if prefix_caches is not None:
            check_kept_caches(prompts, prefix_caches)
            if options.get("past_key_values") is not None:  # the compiled engine's static cache, reset
                fill_static_cache(options["past_key_values"], prefix_caches, prompt_length)
            else:
                options["past_key_values"] = _batch_cache(prefix_caches, prompt_length, model.config)
        if keep_caches:
            options["return_dict_in_generate"] = True
        processors = LogitsProcessorList()
        if replay_lengths is not None:
            processors.append(ReplayLengthsProcessor(replay_lengths, eos_token_ids, prompt_length))
        if clock is not None:
            processors.append(clock)
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_token_ids,
            pad_token_id=tokenizer.pad_token_id,
            logits_processor=processors,
            **sampling_arguments(temperature, top_p),
            **options,
        )
        cache = None
        if keep_caches:
            output, cache = output.sequences, output.past_key_values
            cache = cache if plain_layers(cache) else None
        return samples_from_output(tokenizer, output, prompt_length, prompts, eos_token_ids, cache)


def generate_splitting_on_oom(
    generate,
    prompts: list[list[int]],
    replay_lengths: list[int] | None,
    on_split=None,
    fail_above: int | None = None,
    prefix_caches: list | None = None,
) -> list[GeneratedSample]:
    """`generate(prompts, replay_lengths, prefix_caches)` (a `generate_batch` with the other arguments bound;
    `prefix_caches`: each row's kept KV cache, or None), but a batch that runs out of device memory (VBS batches
    reach 256 rows) is split in halves that run one after the other;
    `on_split()` is called for each split. The same prompts run with the same caps and replayed lengths, so
    greedy and replayed results do not change. `fail_above` raises the real OutOfMemoryError for batches
    larger than it: a fault-injection switch for tests."""
    try:
        if fail_above is not None and len(prompts) > fail_above:
            raise torch.OutOfMemoryError(f"injected: a batch of {len(prompts)} rows is over {fail_above}")
        return generate(prompts, replay_lengths, prefix_caches)
    except torch.OutOfMemoryError:
        if len(prompts) == 1:
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # give the failed attempt's blocks back before the halves run
        if on_split is not None:
            on_split()
        half = len(prompts) // 2
        results = []
        for part in (slice(0, half), slice(half, len(prompts))):
            part_lengths = replay_lengths[part] if replay_lengths is not None else None
            part_caches = prefix_caches[part] if prefix_caches is not None else None
            results += generate_splitting_on_oom(
                generate, prompts[part], part_lengths, on_split, fail_above, part_caches
            )
        return results


# Decode steps per timing in `time_decode_step`: enough to average out the first step's allocations.
TIMED_STEPS = 8


def time_decode_step(generate, vocabulary: int, batch_size: int, context: int, generator: torch.Generator) -> float:
    """The seconds of one decode step of `batch_size` rows at a `context`-token cache through an engine's `generate`:
    random prompts of ordinary tokens (drawn from `generator`), one call of 1 token and one of 1 + TIMED_STEPS, every
    row replayed to the end, so that the prefill cancels out and no EOS ends a row early."""
    # prompts: [B, context]
    prompts = torch.randint(100, vocabulary, (batch_size, context), generator=generator).tolist()
    timings = []
    for new_tokens in (1, 1 + TIMED_STEPS):
        start = time.perf_counter()
        generate(prompts, new_tokens, 0.0, [new_tokens] * batch_size)
        timings.append(time.perf_counter() - start)
    return max(1e-9, (timings[1] - timings[0]) / TIMED_STEPS)
