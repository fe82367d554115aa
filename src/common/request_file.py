"""Request files of `src.infer`: JSON lines (or one JSON list), each record in any of four shapes.

    {"id": "q1", "prompt": "Name three rivers."}                                  # a prompt
    {"instruction": "Name three rivers.", "input": ""}                           # an Alpaca record
    {"id": "q1", "conversations": [{"from": "human", "value": "..."}, ...]}       # a FastChat conversation
    {"custom_id": "q1", "body": {"messages": [{"role": "user", "content": "..."}], "max_tokens": 64}}  # OpenAI batch
    {"custom_id": "q2", "url": "/v1/completions", "body": {"prompt": "Once upon a time"}}  # OpenAI batch, completion

A record without an id (`id`, or `custom_id` for an OpenAI line) gets its line number (its position from 1 in a JSON
list). An Alpaca record becomes the human turn of Stanford Alpaca's template, as in the paper's data; a conversation
that ends with answers ("gpt"/"assistant" turns, such as the paper's references) is asked its last human turn again.
A completion's prompt is continued as it is, without the chat template. `max_tokens`, `temperature`, `top_p`, `seed`
and `stop` (a string or a list of at most four) are a record's own in every shape (at the top of a record, in the body
of an OpenAI line); an OpenAI line is answered with an OpenAI batch output line (src/common/openai_batch.py).

Two kinds of fault. A malformed file (a line that is not JSON, a record of no known shape, a field of the wrong
type, an id given twice) is refused before any model loads, naming the line. A well-formed request that cannot run
(an empty prompt, no user turn) is kept with its `problem`, and `src.infer` writes an error line for its id while the
others run. The file is read as a stream, twice at most (a check, then the run), so memory holds ids, not prompts.
"""

from __future__ import annotations

import gzip
import json
import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .cli import MAX_SEED, temperature_problem
from .prompts import COMPLETION, alpaca_human_turn
from .stops import MAX_STOP_STRINGS
from .utils import UserError, open_text, resolve_json_path

USER, ASSISTANT, SYSTEM = "user", "assistant", "system"
CHAT_ENDPOINT, COMPLETIONS_ENDPOINT = "/v1/chat/completions", "/v1/completions"
# FastChat's speaker names -> the roles of a chat message
FASTCHAT_ROLES = {"human": USER, "user": USER, "gpt": ASSISTANT, "assistant": ASSISTANT, "system": SYSTEM}


@dataclass(frozen=True)
class Request:
    id: str
    messages: tuple[tuple[str, str], ...]  # (role, text) turns, the last one the user's
    line: int  # where it stands in the file, from 1
    max_tokens: int | None = None  # the record's own cap on new tokens (an OpenAI line's body.max_tokens)
    temperature: float | None = None  # the record's own temperature (an OpenAI line's body.temperature)
    problem: str | None = None  # why it cannot run; None when it can
    endpoint: str | None = None  # an OpenAI batch line's url, which decides the shape of its answer; None otherwise
    top_p: float | None = None  # the record's own nucleus of sampling
    seed: int | None = None  # the record's own seed of sampling: its group's draws start from it
    stop: tuple[str, ...] = ()  # strings its answer ends before (src.common.stops)

    @property
    def prompt(self) -> str:
        """The last user turn: what a length predictor reads."""
        return self.messages[-1][1] if self.messages else ""


class _Malformed(Exception):
    """A record of no known shape: the file is refused, naming the line."""


def _text_content(content, where: str) -> str:
    """An OpenAI message's content: a string, or a list of parts whose text parts are joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _Malformed(f"{where}: only text parts are served ({{'type': 'text', 'text': ...}})")
            texts.append(part["text"])
        return "\n".join(texts)
    raise _Malformed(f"{where}: content must be text")


def _openai_messages(messages) -> list[tuple[str, str]]:
    if not isinstance(messages, list):
        raise _Malformed("body.messages must be a list of {role, content}")
    turns = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in (USER, ASSISTANT, SYSTEM):
            raise _Malformed(f"body.messages[{index}] needs a role of user, assistant or system")
        turns.append((message["role"], _text_content(message.get("content"), f"body.messages[{index}]")))
    return turns


def _fastchat_messages(conversations) -> list[tuple[str, str]]:
    if not isinstance(conversations, list):
        raise _Malformed("conversations must be a list of {from, value}")
    turns = []
    for index, turn in enumerate(conversations):
        role = FASTCHAT_ROLES.get(turn.get("from")) if isinstance(turn, dict) else None
        if role is None or not isinstance(turn.get("value"), str):
            raise _Malformed(f"conversations[{index}] needs from (human, gpt or system) and a text value")
        turns.append((role, turn["value"]))
    return turns


def _number(record: dict, key: str, where: str, integer: bool):
    """An optional sampling field: a positive integer (max_tokens) or a finite number at least 0 (temperature)."""
    value = record.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise _Malformed(f"{where}{key} must be a number, got {value!r}")
    if integer and value < 1 or not integer and (not math.isfinite(value) or value < 0):
        raise _Malformed(f"{where}{key} must be {'at least 1' if integer else 'a finite number at least 0'}")
    return value


# An OpenAI batch body's fields: those src.infer honours, those that change nothing here (the model is --model's), and
# those it does not honour, allowed only at the value that asks for what it does anyway; any other field of a body is
# not honoured either, and the request gets an error line naming it instead of an answer that ignores it.
HONOURED_BODY_FIELDS = ("messages", "prompt", "max_tokens", "max_completion_tokens")
HONOURED_BODY_FIELDS += ("temperature", "top_p", "seed", "stop")  # a record's own settings (_own_settings)
IGNORED_BODY_FIELDS = ("model", "user", "metadata", "store")
NEUTRAL_BODY_VALUES = {"n": 1, "stream": False, "logprobs": False, "presence_penalty": 0}
NEUTRAL_BODY_VALUES |= {"frequency_penalty": 0, "echo": False, "best_of": 1}


def unhonoured_body_field(body: dict) -> str | None:
    """Why src.infer cannot answer this body as asked (its first field that it would ignore), or None."""
    for key, value in body.items():
        if key in HONOURED_BODY_FIELDS or key in IGNORED_BODY_FIELDS or value is None:
            continue
        if key in NEUTRAL_BODY_VALUES and value == NEUTRAL_BODY_VALUES[key]:
            continue
        name = json.dumps(key)[1:-1]  # escaped: a lone surrogate in a name cannot be written back raw
        return f"body.{name} = {json.dumps(value)} is not honoured by src.infer: remove it, or ask elsewhere"
    return None


def _is_unicode(text: str) -> bool:
    """False for text that JSON's `\\ud800`-style escapes left with a half of a surrogate pair, which is no character:
    no tokenizer reads it and no UTF-8 file can hold it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _openai_line(record: dict) -> tuple:
    """(turns, the first unhonoured body field, endpoint) of an OpenAI batch line."""
    body, endpoint = record["body"], record.get("url", CHAT_ENDPOINT)
    if endpoint not in (CHAT_ENDPOINT, COMPLETIONS_ENDPOINT):
        raise _Malformed(f"url {endpoint!r}: only {CHAT_ENDPOINT} and {COMPLETIONS_ENDPOINT} lines are answered")
    asked = "messages" if endpoint == CHAT_ENDPOINT else "prompt"
    if not isinstance(body, dict) or asked not in body:
        raise _Malformed(f"an OpenAI batch line to {endpoint} needs body.{asked}")
    if endpoint == CHAT_ENDPOINT:
        turns = _openai_messages(body["messages"])
    elif isinstance(body["prompt"], str):
        turns = [(COMPLETION, body["prompt"])]
    else:
        raise _Malformed("body.prompt must be one text (a line per prompt)")
    return turns, unhonoured_body_field(body), endpoint


def _stop_strings(fields: dict, where: str) -> tuple[str, ...]:
    """A record's stop strings: one string or a list of them (empty ones ask for nothing)."""
    value = fields.get("stop")
    stops = [value] if isinstance(value, str) else value if value is not None else []
    if not isinstance(stops, list) or not all(isinstance(stop, str) for stop in stops):
        raise _Malformed(f"{where}stop must be a string or a list of strings, got {value!r}")
    if len(stops) > MAX_STOP_STRINGS:
        raise _Malformed(f"{where}stop takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}")
    if not all(_is_unicode(stop) for stop in stops):
        raise _Malformed(f"{where}stop holds a lone surrogate escape (such as \\ud800), which is not a character")
    return tuple(stop for stop in stops if stop)


def _own_settings(fields: dict, where: str) -> dict:
    """A record's own max_tokens, temperature, top_p, seed and stop (Request's fields): at the top of a record, or in
    an OpenAI body (`where` "body."), where max_completion_tokens may stand for max_tokens."""
    tokens_key = "max_completion_tokens" if fields.get("max_completion_tokens") is not None else "max_tokens"
    temperature = _number(fields, "temperature", where, integer=False)
    if temperature is not None and temperature_problem(temperature):
        raise _Malformed(f"{where}temperature {temperature_problem(temperature)}")
    top_p = _number(fields, "top_p", where, integer=False)
    if top_p is not None and not 0 < top_p <= 1:
        raise _Malformed(f"{where}top_p must be above 0 and at most 1, got {top_p!r}")
    seed = fields.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED):
        raise _Malformed(f"{where}seed must be an integer from 0 to {MAX_SEED}, got {seed!r}")
    return {
        "max_tokens": _number(fields, tokens_key, where, integer=True),
        "temperature": temperature,
        "top_p": top_p,
        "seed": seed,
        "stop": _stop_strings(fields, where),
    }


def parse_record(record, line: int) -> Request:
    """One record of any known shape -> a Request; raises _Malformed when it has none."""
    if not isinstance(record, dict):
        raise _Malformed("a record must be a JSON object")
    unhonoured = endpoint = None
    if "body" in record:
        turns, unhonoured, endpoint = _openai_line(record)
        identifier = record.get("custom_id", record.get("id"))
    elif "conversations" in record:
        turns = _fastchat_messages(record["conversations"])
        identifier = record.get("id")
    elif "prompt" in record:
        if not isinstance(record["prompt"], str):
            raise _Malformed("prompt must be text")
        turns = [(USER, record["prompt"])]
        identifier = record.get("id")
    elif "instruction" in record:
        instruction, input_text = record["instruction"], record.get("input") or ""
        if not isinstance(instruction, str) or not isinstance(input_text, str):
            raise _Malformed("an Alpaca record's instruction and input must be text")
        turns = [(USER, alpaca_human_turn(instruction, input_text) if instruction.strip() else "")]
        identifier = record.get("id")
    else:
        raise _Malformed(
            "no known shape: give prompt, instruction (Alpaca), conversations (FastChat) or body.messages (OpenAI)"
        )
    own = _own_settings(record["body"], "body.") if "body" in record else _own_settings(record, "")
    if identifier is None:
        identifier = line
    if isinstance(identifier, bool) or not isinstance(identifier, (str, int)):
        raise _Malformed(f"the id must be text or an integer, got {identifier!r}")
    if not _is_unicode(str(identifier)):
        raise _Malformed("the id holds a lone surrogate escape (such as \\ud800), which no UTF-8 output can hold")
    while turns and turns[-1][0] == ASSISTANT:  # answers given with the question (references) are not asked for
        turns.pop()
    problem = unhonoured
    if problem is None and (not turns or turns[-1][0] not in (USER, COMPLETION)):
        problem = "no user turn to answer"
    elif problem is None and not turns[-1][1].strip():
        problem = "empty prompt"
    elif problem is None and not all(_is_unicode(text) for _, text in turns):
        problem = "the text holds a lone surrogate escape (such as \\ud800), which is not a character: fix the escape"
    return Request(str(identifier), tuple(turns), line, problem=problem, endpoint=endpoint, **own)


def _records(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed JSON) of every record: JSON lines (blank lines skipped), or one JSON list."""
    with open_text(path) as handle:
        first = ""
        while not first:
            character = handle.read(1)
            if character == "" or not character.isspace():
                first = character or "\n"
        handle.seek(0)
        if first == "[":  # one JSON list: read whole (JSON lines are the form for large inputs)
            try:
                records = json.load(handle)
            except json.JSONDecodeError as error:
                raise UserError(f"request file {path} is not valid JSON (line {error.lineno}: {error.msg})") from None
            yield from enumerate(records, start=1)
            return
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                yield number, json.loads(text)
            except json.JSONDecodeError as error:
                raise UserError(
                    f"request file {path}, line {number}: not valid JSON ({error.msg}); one JSON object per line"
                ) from None


def read_requests(path: str | Path) -> Iterator[Request]:
    """The requests of a file, in file order, as a stream; a malformed record is a UserError naming its line."""
    path = resolve_json_path(path)
    for number, record in _records(path):
        try:
            yield parse_record(record, number)
        except _Malformed as error:
            raise UserError(f"request file {path}, line {number}: {error}") from None


# src.infer's settings that a record may give itself: the setting's name -> the Request field that holds it
OWN_SETTINGS = {"max_length": "max_tokens", "temperature": "temperature", "top_p": "top_p", "seed": "seed"}


@dataclass
class RequestIndex:
    """What a whole request file asks, held as ids (not prompts): each id's fingerprint in file order, the endpoint
    of each OpenAI batch line, and the largest cap a record gives itself."""

    fingerprints: dict[str, str] = field(default_factory=dict)
    endpoints: dict[str, str] = field(default_factory=dict)
    largest_cap: int | None = None
    # per run setting (max_length, temperature, top_p, seed), the records that give their own: when every record
    # does, the flag changes no answer
    own_settings: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OWN_SETTINGS, 0))
    stopped: int = 0  # records that give stop strings


def check_request_file(path: str | Path) -> RequestIndex:
    """The file's `RequestIndex`, after reading the whole file once: malformed records and repeated ids are refused
    here, before any model loads."""
    resolved = resolve_json_path(path)
    if not resolved.is_file():
        raise UserError(f"request file not found: {path}")
    index, lines = RequestIndex(), {}
    try:
        for request in read_requests(resolved):
            if request.id in lines:
                raise UserError(
                    f"request file {resolved}, line {request.line}: id {request.id!r} was already given on line "
                    f"{lines[request.id]}; ids must be unique"
                )
            lines[request.id] = request.line
            index.fingerprints[request.id] = request_fingerprint(request)
            if request.endpoint is not None:
                index.endpoints[request.id] = request.endpoint
            if request.max_tokens is not None:
                index.largest_cap = max(request.max_tokens, index.largest_cap or 0)
            for setting, field_name in OWN_SETTINGS.items():
                index.own_settings[setting] += getattr(request, field_name) is not None
            index.stopped += bool(request.stop)
    except UnicodeDecodeError:
        raise UserError(f"request file {resolved} is not UTF-8 text") from None
    except (gzip.BadGzipFile, EOFError, zlib.error):
        raise UserError(f"request file {resolved} is not a complete gzip file: make or copy it again") from None
    if not lines:
        raise UserError(f"request file {resolved} holds no requests")
    return index


def request_fingerprint(request: Request) -> str:
    """What the model is asked, as a short hash: the turns and the record's own settings (those of the whole run are
    in the settings file beside the output). An answer records it, so that a resumed run knows whether the request
    it answered is still the one in the file."""
    import hashlib

    asked = [request.messages, request.max_tokens, request.temperature]
    asked += [request.endpoint] if request.endpoint is not None else []  # its answer's shape follows the endpoint
    sampling = {"top_p": request.top_p, "seed": request.seed, "stop": list(request.stop)}
    if request.top_p is not None or request.seed is not None or request.stop:  # earlier answer files stay valid
        asked.append(sampling)
    asked = json.dumps(asked, ensure_ascii=False)
    return hashlib.sha256(asked.encode("utf-8", "surrogatepass")).hexdigest()[:16]
