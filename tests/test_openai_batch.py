"""OpenAI batch in, OpenAI batch out: an OpenAI batch line (chat or completion) is answered with a batch output line
whose body OpenAI's own client types parse; errors come in the `error` object; other shapes keep the compact line."""

from __future__ import annotations

import json

import pytest

from src import infer
from src.common.utils import UserError

from .conftest import cli_args

CHAT = "/v1/chat/completions"


def openai_line(custom_id: str, body: dict, url: str = CHAT) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def test_openai_lines_are_answered_in_openais_output_shape(eos_model_dir, tmp_path):
    openai_types = pytest.importorskip("openai.types")
    from transformers import AutoTokenizer

    question = "Name a color."
    lines = [
        openai_line("chat-1", {"model": "any", "messages": [{"role": "user", "content": question}], "max_tokens": 8}),
        openai_line("text-1", {"model": "any", "prompt": "Once upon a time", "max_tokens": 6}, "/v1/completions"),
        openai_line("two", {"messages": [{"role": "user", "content": question}], "n": 2}),
        {"id": "plain", "prompt": question, "max_tokens": 8},
    ]
    requests, output = tmp_path / "batch.jsonl", tmp_path / "out.jsonl"
    requests.write_text("".join(json.dumps(line) + "\n" for line in lines))
    argv = cli_args(input=requests, output=output, model=eos_model_dir, strategy="vanilla", max_length=24)
    infer.main(argv)
    answers = {line.get("custom_id", line["id"]): line for line in map(json.loads, output.read_text().splitlines())}

    chat = openai_types.chat.ChatCompletion.model_validate(answers["chat-1"]["response"]["body"])
    plain = answers["plain"]  # the same question as a plain record: the compact line, the same answer
    assert set(plain) >= {"id", "text", "finish_reason", "generated_tokens"} and "response" not in plain
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == plain["text"] and chat.choices[0].finish_reason == plain["finish_reason"]
    assert chat.usage.completion_tokens == plain["generated_tokens"] <= 8
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens
    assert answers["chat-1"]["error"] is None and answers["chat-1"]["response"]["status_code"] == 200
    assert chat.system_fingerprint == f"{eos_model_dir.name}:vanilla"

    text = openai_types.Completion.model_validate(answers["text-1"]["response"]["body"])
    tokenizer = AutoTokenizer.from_pretrained(eos_model_dir)
    assert text.object == "text_completion" and isinstance(text.choices[0].text, str)
    assert text.usage.prompt_tokens == len(tokenizer("Once upon a time").input_ids)  # no chat template around it
    assert 1 <= text.usage.completion_tokens <= 6

    refused = answers["two"]
    assert refused["response"] is None and refused["error"]["code"] == "invalid_request"
    assert "body.n = 2 is not honoured" in refused["error"]["message"]

    assert infer.main(argv)["requests"] == 0  # the rerun finds every line, in either shape, answered
    lines[0]["body"]["messages"][0]["content"] = "Name a fruit."
    requests.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(UserError, match="answers id 'chat-1' as it was asked before"):
        infer.main(argv)


def test_the_same_question_in_another_shape_is_another_request(tmp_path):
    """A plain record and an OpenAI line asking the same text are answered in different shapes, so a rerun after the
    file changed from one to the other answers anew (--redo-changed) instead of keeping the other shape's line; a
    field name that is no text (a lone surrogate) is named escaped in the error line."""
    from src.common.request_file import check_request_file, read_requests

    path = tmp_path / "in.jsonl"
    chat = openai_line("q", {"messages": [{"role": "user", "content": "Hi."}], "\ud800": 1})
    path.write_text(json.dumps({"id": "q", "prompt": "Hi."}) + "\n")
    plain = check_request_file(path).fingerprints["q"]
    path.write_text(json.dumps(chat) + "\n")
    assert check_request_file(path).fingerprints["q"] != plain
    (request,) = read_requests(path)
    assert request.problem.startswith("body.\\ud800 = 1 is not honoured")
    request.problem.encode("utf-8")  # an error line can hold it


def test_a_line_to_another_endpoint_or_with_a_list_of_prompts_is_refused(tmp_path):
    from src.common.request_file import check_request_file

    for line, message in (
        (openai_line("e", {"input": "x"}, "/v1/embeddings"), "only /v1/chat/completions and /v1/completions"),
        (openai_line("l", {"prompt": ["a", "b"]}, "/v1/completions"), "body.prompt must be one text"),
        (openai_line("m", {"prompt": "a"}), "to /v1/chat/completions needs body.messages"),
    ):
        path = tmp_path / f"{line['custom_id']}.jsonl"
        path.write_text(json.dumps(line) + "\n")
        with pytest.raises(UserError, match=message):
            check_request_file(path)
