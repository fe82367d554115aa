"""What `+resume` keeps of each sample that stopped unfinished, so that its retry continues instead of starting over:
every token of its latest attempt, and, where the engine can hand it back (`keeps_kv_caches`), that attempt's KV cache
within the memory share `memory.KEPT_ROW_CACHES`. A resumed batch whose every member has its cache skips the prefill;
one member without it (never kept, or over the budget) sends the whole batch through a prefill of prompt and tokens.
Everything is keyed by sample id."""

from __future__ import annotations

from ..common.memory import KEPT_ROW_CACHES, budget_bytes
from ..scheduling.batches import Batch


class KeptRows:
    def __init__(self, device: str):
        self.device = device
        self.unfinished_tokens: dict[str, list[int]] = {}  # id -> every token of its latest unfinished attempt
        self.kv_caches: dict[str, tuple] = {}  # id -> the KV cache of that attempt (GeneratedSample.kv_cache)
        self.kv_cache_bytes = 0
        self.budget_bytes: int | None = None  # set at the first cache kept, from the memory free then

    def tokens_of(self, batch: Batch) -> list[list[int]]:
        """The tokens each member continues from ([] for one that starts afresh), in the batch's order."""
        kept = []
        for sample_id, done in zip(batch.ids, batch.resume_from or (0,) * len(batch.ids), strict=True):
            tokens = self.unfinished_tokens.get(sample_id, []) if done else []
            if len(tokens) != done:
                raise RuntimeError(
                    f"id {sample_id} resumes from {done} tokens, but its last attempt kept {len(tokens)}"
                )
            kept.append(tokens)
        return kept

    def take_caches(self, batch: Batch, prompts: list[list[int]]) -> list[tuple] | None:
        """The members' kept caches when every one has a cache over its prompt and tokens (all but the last), else
        None (the batch is prefilled); either way the batch takes them over."""
        caches = [self.drop_cache(sample_id) for sample_id in batch.ids]
        if not batch.resume_from or any(
            cache is None or cache[0][0].shape[2] != len(prompt) - 1
            for cache, prompt in zip(caches, prompts, strict=True)
        ):
            return None
        return caches

    def drop_cache(self, sample_id: str):
        from ..engines.generate import kv_cache_bytes

        cache = self.kv_caches.pop(sample_id, None)
        if cache is not None:
            self.kv_cache_bytes -= kv_cache_bytes(cache)
        return cache

    def keep_cache(self, sample_id: str, cache) -> None:
        """Kept while the budget has room; past it the sample's retry is prefilled again."""
        from ..engines.generate import kv_cache_bytes

        if self.budget_bytes is None:
            self.budget_bytes = budget_bytes(KEPT_ROW_CACHES, self.device) or 0
        size = kv_cache_bytes(cache)
        if self.kv_cache_bytes + size <= self.budget_bytes:
            self.kv_caches[sample_id] = cache
            self.kv_cache_bytes += size

    def record_attempt(self, sample_id: str, tokens: list[int], finished: bool, cache, keep_cache: bool) -> None:
        """After a batch: a finished sample is forgotten; an unfinished one keeps its tokens, and its cache when the
        scheduler will resume it (`keep_cache`)."""
        self.drop_cache(sample_id)
        if finished:
            self.unfinished_tokens.pop(sample_id, None)
            return
        self.unfinished_tokens[sample_id] = tokens
        if keep_cache and cache is not None:
            self.keep_cache(sample_id, cache)
