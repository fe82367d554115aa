"""The `slots` engine: continuous batching on a fixed set of rows of one preallocated KV cache, decoded by our own loop.

When a row's answer ends, the next queued request takes that row at the next step: its prompt is prefilled on its own
and its keys and values are copied into the row, right-aligned against the column that every row writes next (as
+resume copies kept rows into a static cache). No row waits for a longer neighbour, so every decode step works on as
many live answers as there are requests left, and a step costs what a static batch's step of as many rows costs:
transformers' paged continuous-batching manager spends far more per iteration on the small models this project runs on
a CPU. The manager stays the comparator (`--engine transformers`, strategy `continuous`).

The cache (per layer keys and values, [S, H, L, D]) has one write column shared by every row, so a decode step is one
forward pass of S rows and one token each. Each row's own positions and its attention mask (the columns from its
prompt's first token up to the write column) make it independent of the others, whatever they hold. The attention
reads only the columns up to the write column; when that column reaches the cache's end, or the columns before the
oldest live row are many, the live columns move left (one copy); when the queue is empty and at most half the rows
are live, the live rows move into a cache of fewer rows, so the last answers run in cheaper steps.

Static batches (`generate`), step timing and sampled queues (temperature above 0) go to the `transformers` engine this
engine holds: the loop here decodes greedily (with replayed lengths where asked). Every step reads its tokens back on
the host, to refill finished rows at once.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..common.stops import holds_stop, tail_holds_stop
from .base import DEFAULT_CONTINUOUS_SPEED, ContinuousOutcome, EngineBase, QueueResult
from .decode_loop import EndTokens
from .eager import TransformersEngine
from .generate import GeneratedSample, left_pad, replay_scores
from .slot_cache import SlotCache

# Dead columns (before the oldest live row's first one) that make the live columns move left: each step's attention
# reads them, and a move copies only the live ones, so a few dozen wasted columns cost more than the move.
DEAD_COLUMNS_BEFORE_MOVE = 64
# A prefix every queued prompt shares is prefilled once and copied into each new row (the prompts' chat template and
# instruction header: most of a short prompt); below this many tokens the copy saves nothing worth the extra pass.
SHARED_PREFIX_MIN_TOKENS = 16


@dataclass
class Answer:
    """One request in a row: where its keys and values start, what it has generated, when it must stop."""

    request_id: str
    first_column: int
    prompt_length: int
    cap: int  # most tokens it may generate
    target: int  # replayed length (EOS forced there, forbidden before); 0: free
    tokens: list[int] = field(default_factory=list)

    @property
    def position(self) -> int:
        """The position of its last token, the input of its next step (positions count from its prompt's first)."""
        return self.prompt_length + len(self.tokens) - 1


def choose_tokens(logits: torch.Tensor, answers: list[Answer], end: EndTokens) -> list[int]:
    """The greedy next token of each answer from its `logits` ([N, V]), with its replayed length applied as
    `generate`'s replay processor applies it: EOS forbidden before the target and forced at it."""
    logits = logits.float()
    targets = [answer.target for answer in answers]
    if any(targets):
        device = logits.device
        target = torch.tensor(targets, device=device)  # [N]
        step = torch.tensor([len(answer.tokens) + 1 for answer in answers], device=device)  # [N]
        logits = replay_scores(logits, target, step, end.eos_mask, end.forced_end)
    return torch.argmax(logits, dim=-1).tolist()


def shared_prefix(prompts: list[list[int]]) -> list[int]:
    """The tokens every prompt starts with (a chat template's system turn, an instruction header), short of each
    prompt's last token, whose logits the prefill must compute; empty when shorter than SHARED_PREFIX_MIN_TOKENS."""
    first = prompts[0]
    length = min(len(prompt) for prompt in prompts) - 1
    for prompt in prompts[1:]:
        length = next((index for index in range(length) if prompt[index] != first[index]), length)
    return first[:length] if length >= SHARED_PREFIX_MIN_TOKENS else []


def prefill_prefix(model, prefix: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The shared prefix's keys and values, per layer ([1, H, P, D], [1, H, P, D]); [] without one."""
    if not prefix:
        return []
    input_ids = torch.tensor([prefix], device=model.device)  # [1, P]
    output = model(input_ids=input_ids, use_cache=True, logits_to_keep=1)
    return [(layer.keys, layer.values) for layer in output.past_key_values.layers]


def prefill(model, prompts: list[list[int]], pad_token_id: int, prefix_cache: list[tuple]):
    """The prompts' forward pass, left-padded into one batch, computing only what follows the shared prefix whose
    keys and values `prefix_cache` holds (per layer [1, H, P, D]; [] for none). Returns the last position's logits
    ([N, V]) and each prompt's keys and values without padding (per row, per layer ([H, P + T, D], [H, P + T, D]))."""
    from transformers import DynamicCache

    shared = prefix_cache[0][0].shape[2] if prefix_cache else 0
    suffixes = [prompt[shared:] for prompt in prompts]
    input_ids, suffix_mask = left_pad(suffixes, pad_token_id, model.device)  # [N, W]
    rows, width = input_ids.shape
    position_ids = shared + (suffix_mask.cumsum(-1) - 1).masked_fill(suffix_mask == 0, 0)  # [N, W]
    attention_mask = torch.cat([suffix_mask.new_ones((rows, shared)), suffix_mask], dim=1)  # [N, P + W]
    cache = None
    if prefix_cache:  # every row starts from its own copy of the prefix: the forward pass appends to it
        cache = DynamicCache(
            [(keys.expand(rows, -1, -1, -1).contiguous(), values.expand(rows, -1, -1, -1).contiguous())
             for keys, values in prefix_cache],
            config=model.config,
        )  # fmt: skip
    output = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )

    def without_padding(tensor, row, suffix):  # tensor: [N, H, P + W, D] -> [H, P + T, D]
        return torch.cat([tensor[row, :, :shared], tensor[row, :, shared + width - len(suffix) :]], dim=1)

    kept = [
        [(without_padding(layer.keys, row, suffix), without_padding(layer.values, row, suffix))
         for layer in output.past_key_values.layers]
        for row, suffix in enumerate(suffixes)
    ]  # fmt: skip
    return output.logits[:, -1], kept


def decode_one_token(model, cache: SlotCache, tokens, positions, mask) -> torch.Tensor:
    """One step of every row: tokens, positions [S, 1], mask [S, 1, 1, K] (0 where a row attends, the dtype's lowest
    elsewhere). Returns the next token's logits [S, V]."""
    return model(
        input_ids=tokens, position_ids=positions, attention_mask=mask, past_key_values=cache, use_cache=True
    ).logits[:, -1]


class SlotRun:
    """One `run_queue` call: the queue, the rows and the cache, stepped until every request has its answer."""

    def __init__(self, engine: SlotEngine, order, prompt_ids, max_length, slots, replay, on_result, stops):
        self.engine, self.model = engine, engine.model
        self.queue = deque(order)
        self.prompt_ids, self.max_length, self.replay, self.on_result = prompt_ids, max_length, replay, on_result
        self.stops = stops  # request id -> the stop strings that end its row as soon as its text holds one
        self.longest_prompt = max(len(prompt_ids[request_id]) for request_id in order)
        self.prefix_cache = prefill_prefix(self.model, shared_prefix([prompt_ids[request_id] for request_id in order]))
        length = self.longest_prompt + max_length + DEAD_COLUMNS_BEFORE_MOVE
        self.cache = SlotCache.allocate(self.model, min(slots, len(order)), length)
        self.rows: list[Answer | None] = [None] * self.cache.rows
        self.outcome = ContinuousOutcome({}, {}, {}, {}, settings={"engine": engine.name})
        self.start = time.perf_counter()

    def run(self) -> ContinuousOutcome:
        while self.queue or any(self.rows):
            self.admit()
            if not any(self.rows):
                continue
            self.make_room()
            self.step()
        return self.outcome

    def admit(self) -> None:
        """Queued requests into the free rows, prefilled together; answers of one token end at once."""
        free = [row for row, answer in enumerate(self.rows) if answer is None]
        admitted = [self.queue.popleft() for _ in range(min(len(free), len(self.queue)))]
        if not admitted:
            return
        prompts = [self.prompt_ids[request_id] for request_id in admitted]
        longest = max(len(prompt) for prompt in prompts)
        if self.cache.column.index < longest:  # the new prompts end just before the write column
            self.move_live_columns(longest)
        logits, kept = prefill(self.model, prompts, self.engine.tokenizer.pad_token_id, self.prefix_cache)
        column = self.cache.column.index
        answers = []
        for row, request_id, prompt, keys_and_values in zip(free, admitted, prompts, kept, strict=False):
            self.cache.place(row, keys_and_values)
            target = max(1, int(self.replay[request_id])) if self.replay is not None else 0
            answers.append(Answer(request_id, column - len(prompt), len(prompt), self.max_length, target))
            self.rows[row] = answers[-1]
        self.record(free[: len(admitted)], answers, choose_tokens(logits, answers, self.engine.end_tokens(logits)))

    def make_room(self) -> None:
        """Before a step: a column to write in, few dead columns to attend over, and no more rows than needed."""
        live = [row for row, answer in enumerate(self.rows) if answer is not None]
        if not self.queue and len(live) <= self.cache.rows // 2:
            self.cache.keep_rows(live)
            self.rows = [self.rows[row] for row in live]
        first = min(answer.first_column for answer in self.rows if answer is not None)
        full = self.cache.column.index >= self.cache.length
        if full or first >= DEAD_COLUMNS_BEFORE_MOVE:
            self.move_live_columns(0)

    def move_live_columns(self, at_least: int) -> None:
        """Every live row's columns move to start at column 0 (the write column at `at_least` or later)."""
        first = min(
            (answer.first_column for answer in self.rows if answer is not None), default=self.cache.column.index
        )
        new_end = max(self.cache.column.index - first, at_least)
        shift = new_end - self.cache.column.index
        self.cache.move_columns(first, new_end)
        for answer in self.rows:
            if answer is not None:
                answer.first_column += shift

    def step(self) -> None:
        """One decode step of every row; free rows compute too (attending to their own column) and are ignored."""
        device, column = self.model.device, self.cache.column.index
        live = [(row, answer) for row, answer in enumerate(self.rows) if answer is not None]
        tokens, positions = [0] * self.cache.rows, [0] * self.cache.rows
        first_columns = [column] * self.cache.rows
        for row, answer in live:
            tokens[row], positions[row], first_columns[row] = answer.tokens[-1], answer.position, answer.first_column
        tokens = torch.tensor(tokens).unsqueeze(1)  # [S, 1]
        positions = torch.tensor(positions).unsqueeze(1)  # [S, 1]
        first_columns = torch.tensor(first_columns)  # [S]
        attends = torch.arange(column + 1) >= first_columns[:, None]  # [S, K]
        dtype = next(self.model.parameters()).dtype
        mask = torch.zeros(attends.shape, dtype=dtype).masked_fill(~attends, torch.finfo(dtype).min)
        logits = decode_one_token(
            self.model, self.cache, tokens.to(device), positions.to(device), mask[:, None, None, :].to(device)
        )  # [S, V]
        self.cache.column.index += 1
        rows = [row for row, _ in live]
        answers = [answer for _, answer in live]
        self.record(rows, answers, choose_tokens(logits[rows], answers, self.engine.end_tokens(logits)))

    def record(self, rows: list[int], answers: list[Answer], tokens: list[int]) -> None:
        """Each answer's new token; an answer that emitted EOS, completed a stop string or reached its cap is told
        and frees its row."""
        eos, decode = self.engine.eos_token_ids, self.decode
        for row, answer, token in zip(rows, answers, tokens, strict=True):
            answer.tokens.append(token)
            stops = self.stops.get(answer.request_id)
            ended = token in eos or bool(stops) and tail_holds_stop(answer.tokens, decode, stops)
            if ended and token not in eos:  # the tail's text may read differently once decoded with what precedes it
                ended = holds_stop(decode(answer.tokens), stops)
            if ended or len(answer.tokens) >= answer.cap:
                self.finish(answer, ended)
                self.rows[row] = None

    def decode(self, token_ids: list[int]) -> str:
        return self.engine.tokenizer.decode(token_ids, skip_special_tokens=True)

    def finish(self, answer: Answer, ended: bool) -> None:
        outcome, request_id = self.outcome, answer.request_id
        outcome.lengths[request_id] = len(answer.tokens)
        outcome.finished[request_id] = ended
        outcome.texts[request_id] = self.decode(answer.tokens)
        outcome.finish_seconds[request_id] = time.perf_counter() - self.start
        if self.on_result is not None:
            self.on_result(
                QueueResult(
                    request_id,
                    outcome.lengths[request_id],
                    ended,
                    outcome.texts[request_id],
                    outcome.finish_seconds[request_id],
                    len(outcome.lengths),
                )
            )


class SlotEngine(EngineBase):
    name = "slots"
    keeps_kv_caches = True  # its static batches are the transformers engine's

    def __init__(self, model, tokenizer):
        super().__init__(model, tokenizer)
        self.static = TransformersEngine(model, tokenizer)
        self.eos_token_ids = self.static.eos_token_ids
        self._end_tokens: EndTokens | None = None

    def end_tokens(self, logits: torch.Tensor) -> EndTokens:
        if self._end_tokens is None:
            self._end_tokens = EndTokens.of(
                self.eos_token_ids, logits.shape[-1], logits.device, self.tokenizer.pad_token_id
            )
        return self._end_tokens

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
        samples = self.static.generate(
            prompts, max_new_tokens, temperature, replay_lengths, prefix_caches, keep_caches, top_p
        )
        self.last_timing = self.static.last_timing
        return samples

    def decode_step_seconds(self, batch_size: int, context: int) -> float:
        return self.static.decode_step_seconds(batch_size, context)

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
        if temperature > 0:  # a request's draws would depend on its neighbours here: the manager samples
            return self.static.run_queue(
                order, prompt_ids, max_length, slots, temperature, replay, on_result, seed, speed, top_p, stops
            )
        if not order:
            return ContinuousOutcome({}, {}, {}, {}, settings={"engine": self.name})
        with torch.inference_mode():
            return SlotRun(self, order, prompt_ids, max_length, slots, replay, on_result, stops or {}).run()
