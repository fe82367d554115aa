"""Stop strings (an OpenAI request's `stop`): an answer ends where its text first holds one of them.

Two places apply them. An engine may end a row as soon as its text holds a stop string, so that no step is spent past
it (`first_stop_token`; the slots engine does, and the static-batch executor counts a batch's answers that way after
the batch); and every answer's text is cut before its first stop string when it is written (`cut_at_stop`), whatever
the engine did, so that the text never depends on the engine. As in OpenAI's API, the stop string itself is not part
of the text, and an answer cut there finished with reason "stop".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

# OpenAI's API takes at most this many stop strings per request
MAX_STOP_STRINGS = 4


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """`text` up to (not including) the earliest place any of `stops` begins, and whether it was cut there."""
    starts = [text.find(stop) for stop in stops if stop]
    starts = [start for start in starts if start >= 0]
    if not starts:
        return text, False
    return text[: min(starts)], True


def holds_stop(text: str, stops: Sequence[str]) -> bool:
    return any(stop and stop in text for stop in stops)


def first_stop_token(token_ids: Sequence[int], decode: Callable[[Sequence[int]], str], stops: Sequence[str]):
    """The fewest leading tokens of `token_ids` whose text holds a stop string (the answer's length had the row ended
    there), or None when the whole text holds none. Once a prefix's text holds a stop string every longer prefix's
    does, so the count is found by bisection: about log2(len(token_ids)) decodes, not one per token."""
    if not stops or not holds_stop(decode(token_ids), stops):
        return None
    low, high = 1, len(token_ids)  # the text of `high` tokens holds a stop; of `low - 1` tokens, none
    while low < high:
        middle = (low + high) // 2
        if holds_stop(decode(token_ids[:middle]), stops):
            high = middle
        else:
            low = middle + 1
    return high


def tail_holds_stop(token_ids: Sequence[int], decode: Callable[[Sequence[int]], str], stops: Sequence[str]) -> bool:
    """Whether the last token completed a stop string in the text of a row's tokens, reading only the last tokens:
    what a decode loop checks after every step. A character takes at most 4 tokens (byte-level tokens of its UTF-8
    bytes), so a stop string of n characters that the last token completed lies within the last 4 n + 1 tokens."""
    longest = max(len(stop) for stop in stops)
    return holds_stop(decode(token_ids[-(4 * longest + 1) :]), stops)
