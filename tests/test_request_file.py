"""Request files of src.infer: the four record shapes, ids by line, what is refused (naming the line) and what only
becomes an error line."""

from __future__ import annotations

import json

import pytest

from src.common.prompts import alpaca_human_turn
from src.common.request_file import check_request_file, read_requests
from src.common.utils import UserError


def write_lines(path, records: list) -> str:
    path.write_text("".join((record if isinstance(record, str) else json.dumps(record)) + "\n" for record in records))
    return str(path)


def test_every_shape_becomes_a_conversation_with_its_own_id(tmp_path):
    path = write_lines(
        tmp_path / "in.jsonl",
        [
            {"id": "p", "prompt": "Name a color."},
            {"instruction": "Add the numbers.", "input": "2 and 3"},  # no id: its line number, 2
            "",  # blank lines are skipped, and lines keep their numbers
            {"id": 7, "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
            {
                "custom_id": "o",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": "x",
                    "messages": [
                        {"role": "system", "content": "Be brief."},
                        {"role": "user", "content": [{"type": "text", "text": "One"}, {"type": "text", "text": "Two"}]},
                    ],
                    "max_tokens": 9,
                    "temperature": 0.5,
                },
            },
        ],
    )
    requests = list(read_requests(path))
    assert [(request.id, request.line) for request in requests] == [("p", 1), ("2", 2), ("7", 4), ("o", 5)]
    assert requests[0].messages == (("user", "Name a color."),)
    assert requests[1].prompt == alpaca_human_turn("Add the numbers.", "2 and 3")
    assert requests[2].messages == (("user", "Hi"),)  # the reference answer is not asked for
    assert requests[3].messages == (("system", "Be brief."), ("user", "One\nTwo"))
    assert (requests[3].max_tokens, requests[3].temperature) == (9, 0.5)
    assert all(request.problem is None for request in requests)
    assert list(check_request_file(path).fingerprints) == ["p", "2", "7", "o"]


def test_a_json_list_numbers_records_from_one(tmp_path):
    path = tmp_path / "in.json"
    path.write_text(json.dumps([{"prompt": "a"}, {"prompt": "b"}]))
    assert [request.id for request in read_requests(path)] == ["1", "2"]


def test_requests_that_cannot_run_are_kept_with_their_problem(tmp_path):
    path = write_lines(
        tmp_path / "in.jsonl",
        [
            {"id": "empty", "prompt": "  \n"},
            {"id": "system-only", "body": {"messages": [{"role": "system", "content": "x"}]}},
            {"id": "no-instruction", "instruction": ""},
            {"id": "half-a-pair", "prompt": "Say \ud800 hi."},  # json.dumps writes the escape, json.loads reads it
        ],
    )
    problems = {request.id: request.problem for request in read_requests(path)}
    assert problems == {
        "empty": "empty prompt",
        "system-only": "no user turn to answer",
        "no-instruction": "empty prompt",
        "half-a-pair": problems["half-a-pair"],
    }
    assert problems["half-a-pair"].startswith("the text holds a lone surrogate escape")


def test_an_openai_field_that_would_be_ignored_becomes_an_error_line_naming_it(tmp_path):
    """A field src.infer does not honour (n > 1, streaming, log probabilities, tools, ...) is refused for its line;
    at the value that asks for what src.infer does anyway (n 1, stream false), or a field that changes nothing here
    (the model, the user), the line is answered."""
    messages = [{"role": "user", "content": "hi"}]
    bodies = {
        "n2": {"n": 2},
        "stream": {"stream": True},
        "logprobs": {"logprobs": True},
        "tools": {"tools": []},
        "plain": {"model": "gpt-4o-mini", "user": "u1", "n": 1, "stream": False, "top_p": 1, "stop": None},
        "no-stop": {"stop": []},
    }
    lines = [{"custom_id": name, "body": {"messages": messages, **fields}} for name, fields in bodies.items()]
    problems = {request.id: request.problem for request in read_requests(write_lines(tmp_path / "in.jsonl", lines))}
    suffix = " is not honoured by src.infer: remove it, or ask elsewhere"
    assert problems == {
        "n2": "body.n = 2" + suffix,
        "stream": "body.stream = true" + suffix,
        "logprobs": "body.logprobs = true" + suffix,
        "tools": "body.tools = []" + suffix,
        "plain": None,
        "no-stop": None,
    }


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "not valid JSON"),
        ('"a string"', "a JSON object"),
        ('{"text": "hi"}', "no known shape"),
        ('{"prompt": 3}', "prompt must be text"),
        ('{"custom_id": "x", "body": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": "9"}}', "number"),
        ('{"custom_id": "x", "body": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}}', "at least"),
        ('{"custom_id": "x", "body": {"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}}', "finite"),
        ('{"custom_id": "x", "body": {"messages": [{"role": "user", "content": "hi"}], "temperature": 1e-9}}', "0.001"),
        ('{"custom_id": "x", "body": {"messages": [{"role": "user", "content": "hi"}], "top_p": 0}}', "above 0"),
        ('{"custom_id": "x", "body": {"messages": [{"role": "user", "content": "hi"}], "top_p": 1.5}}', "at most 1"),
        ('{"custom_id": "x", "body": {"messages": [{"role": "user", "content": "hi"}], "seed": 1.5}}', "seed must"),
        ('{"custom_id": "x", "body": {"messages": [{"role": "user", "content": "hi"}], "seed": -1}}', "seed must"),
        ('{"custom_id": "x", "body": {"messages": [{"role": "user", "content": "hi"}], "stop": 3}}', "list of strings"),
        ('{"id": "x", "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}', "at most 4 strings"),
        ('{"custom_id": "x", "body": {"messages": [{"role": "bot", "content": "hi"}]}}', "role"),
        ('{"id": "x", "body": {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}}', "text parts"),
        ('{"id": "x", "conversations": [{"from": "robot", "value": "hi"}]}', "from"),
        ('{"id": ["x"], "prompt": "hi"}', "id must be"),
        ('{"id": "first", "prompt": "again"}', "already given on line 1"),
    ],
)
def test_a_malformed_record_refuses_the_file_naming_its_line(tmp_path, line, message):
    path = write_lines(tmp_path / "in.jsonl", [{"id": "first", "prompt": "hi"}, line])
    with pytest.raises(UserError, match=message) as error:
        check_request_file(path)
    assert "line 2" in str(error.value)


def test_an_empty_or_missing_file_is_refused(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(UserError, match="holds no requests"):
        check_request_file(tmp_path / "empty.jsonl")
    with pytest.raises(UserError, match="not found"):
        check_request_file(tmp_path / "nowhere.jsonl")


def test_top_p_seed_and_stop_are_a_records_own_in_every_shape(tmp_path):
    """An OpenAI body's and a plain record's top_p, seed and stop are read (one stop string stands for a list of one;
    empty ones ask for nothing); they change the fingerprint, and a record without them keeps the fingerprint it had
    before these fields were read, so that answer files written then are still continued."""
    messages = [{"role": "user", "content": "hi"}]
    path = write_lines(
        tmp_path / "in.jsonl",
        [
            {"custom_id": "o", "body": {"messages": messages, "top_p": 0.5, "seed": 7, "stop": ["\n\n", "", "END"]}},
            {"id": "p", "prompt": "hi", "stop": "."},
            {"id": "q", "prompt": "hi"},
        ],
    )
    requests = {request.id: request for request in read_requests(path)}
    assert (requests["o"].top_p, requests["o"].seed, requests["o"].stop) == (0.5, 7, ("\n\n", "END"))
    assert (requests["p"].top_p, requests["p"].seed, requests["p"].stop) == (None, None, (".",))
    assert (requests["q"].top_p, requests["q"].seed, requests["q"].stop) == (None, None, ())
    index = check_request_file(path)
    assert index.own_settings == {"max_length": 0, "temperature": 0, "top_p": 1, "seed": 1}
    # the fingerprint of a bare prompt, as every earlier answer file recorded it (worked out before these fields)
    import hashlib

    bare = json.dumps([[["user", "hi"]], None, None], ensure_ascii=False)
    assert index.fingerprints["q"] == hashlib.sha256(bare.encode()).hexdigest()[:16]
    assert index.fingerprints["p"] != index.fingerprints["q"]
