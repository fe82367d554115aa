"""Stop strings: where a text is cut, and how many tokens an answer needed to complete its first stop string, found
with a toy decoder (token i decodes to the i-th character of a known string) so that every count is checked by hand."""

from __future__ import annotations

from src.common.stops import cut_at_stop, first_stop_token, tail_holds_stop


def decoder(text: str):
    """Token i is the character text[i]: the decode of a token list is those characters joined."""
    return lambda token_ids: "".join(text[i] for i in token_ids)


def test_the_text_is_cut_before_the_earliest_stop_string_of_any():
    assert cut_at_stop("one. two\n\nthree END", ["END", "\n\n"]) == ("one. two", True)
    assert cut_at_stop("one. two", ["END"]) == ("one. two", False)
    assert cut_at_stop("END at once", ["END"]) == ("", True)
    assert cut_at_stop("no stops asked", []) == ("no stops asked", False)


def test_the_answer_ends_at_the_token_that_completes_a_stop_string():
    text = "abc--def--"
    tokens = list(range(len(text)))  # a, b, c, -, -, d, ...
    decode = decoder(text)
    assert first_stop_token(tokens, decode, ["--"]) == 5  # "abc--": the fifth token completes the first "--"
    assert first_stop_token(tokens, decode, ["def", "c-"]) == 4  # "abc-" holds "c-" before "def" is complete
    assert first_stop_token(tokens, decode, ["xyz"]) is None
    assert first_stop_token(tokens, decode, []) is None
    assert first_stop_token(tokens, decode, ["a"]) == 1


def test_a_decode_loop_sees_a_stop_string_in_the_last_tokens_only_when_the_last_token_completed_it():
    text = "hello world. More"
    decode = decoder(text)
    tokens = list(range(len(text)))
    assert tail_holds_stop(tokens[:12], decode, [". "]) is False  # "hello world." : the space is not there yet
    assert tail_holds_stop(tokens[:13], decode, [". "]) is True
    assert tail_holds_stop(tokens[:5], decode, ["hello"]) is True
