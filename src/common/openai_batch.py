"""Answers in the shape of OpenAI batch output: a request read from an OpenAI batch line is answered with the line
that the OpenAI Batch API and `vllm run-batch` write, so that code written for their output reads ours.

    {"id": "q1", "custom_id": "q1", "error": null, "scheduling": {...},
     "response": {"status_code": 200, "request_id": "req-q1", "body": <a chat.completion or a text_completion>}}

The body holds the answer (`choices[0].message.content`, or `.text` for /v1/completions), its `finish_reason`
("stop" or "length"), `usage` in tokens, the model, and a `system_fingerprint` that names the model and the
strategy. A request that could not run has `response: null` and `error: {"code": "invalid_request", "message"}`.
`id` repeats `custom_id`, the key by which a rerun finds what was answered. This tool's own fields (the predicted
length, the attempts, the fingerprint of the request) are under `scheduling`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .request_file import COMPLETIONS_ENDPOINT

EXTRA_KEY = "scheduling"
OWN_FIELDS = ("predicted_length", "attempts", "request")


@dataclass
class OpenAIBatchOutput:
    """What an answer line needs beyond its row: each OpenAI line's endpoint (by id), the model and the strategy."""

    endpoints: dict[str, str]
    model: str
    strategy: str
    created: int = field(default_factory=lambda: int(time.time()))

    def line(self, row: dict) -> dict:
        """The answer row of `answers.answer_row` or `answers.error_row` (with its "request"), as a batch line."""
        custom_id = row["id"]
        line = {"id": custom_id, "custom_id": custom_id}
        own = {key: row[key] for key in OWN_FIELDS if key in row}
        if "error" in row:
            error = {"code": "invalid_request", "message": row["error"]}
            return line | {"response": None, "error": error, EXTRA_KEY: own}
        usage = {"prompt_tokens": row["prompt_tokens"], "completion_tokens": row["generated_tokens"]}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        choice = {"index": 0, "finish_reason": row["finish_reason"], "logprobs": None}
        if self.endpoints[custom_id] == COMPLETIONS_ENDPOINT:
            kind, prefix, choice = "text_completion", "cmpl", choice | {"text": row["text"]}
        else:
            message = {"role": "assistant", "content": row["text"]}
            kind, prefix, choice = "chat.completion", "chatcmpl", choice | {"message": message}
        body = {"id": f"{prefix}-{row.get('request', custom_id)}", "object": kind, "created": self.created}
        body |= {"model": self.model, "system_fingerprint": f"{self.model}:{self.strategy}"}
        body |= {"choices": [choice], "usage": usage}
        response = {"status_code": 200, "request_id": f"req-{custom_id}", "body": body}
        return line | {"response": response, "error": None, EXTRA_KEY: own}


def recorded_request(row: dict) -> str | None:
    """The request fingerprint an answer line recorded, in either shape."""
    return row.get("request", (row.get(EXTRA_KEY) or {}).get("request"))
