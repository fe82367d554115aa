"""`src.sample` reproduces the paper's split; `src.construct` builds the perception set."""

from __future__ import annotations

import json
import re

import pytest

from src import construct, sample
from src.common.data import load_conversations
from src.common.prompts import QUERY_PROMPT
from src.common.utils import read_json

from .conftest import PAPER_DATA, SMALL_LENGTHS

WITH_INPUT = re.compile(r"^Below.*?### Instruction:\n(.*)\n\n### Input:\n(.*)\n\n### Response:$", re.S)
NO_INPUT = re.compile(r"^Below is an instruction.*?### Instruction:\n(.*)\n\n### Response:$", re.S)


def alpaca_record(human: str, output: str) -> dict:
    """Undo the Alpaca template: the instruction/input/output record that produced a human turn."""
    match = WITH_INPUT.match(human)
    if match:
        return {"instruction": match.group(1), "input": match.group(2), "output": output}
    match = NO_INPUT.match(human)
    assert match, human[:80]
    return {"instruction": match.group(1), "input": "", "output": output}


def test_split_reproduces_the_paper_files(tmp_path):
    """An alpaca_data.json-shaped file rebuilt from the 20k shipped records (the other 32k are fillers)
    gives back both splits exactly: the same ids, and the same human and gpt turns."""
    expected = {}
    for name in ("train", "val"):
        expected[name] = read_json(PAPER_DATA / f"alpaca-{name}-10k.json", "paper data")
    records = [{"instruction": f"filler {i}", "input": "", "output": ""} for i in range(sample.ALPACA_SIZE)]
    for conversations in expected.values():
        for item in conversations:
            human, gpt = item["conversations"][0]["value"], item["conversations"][1]["value"]
            records[int(item["id"]) - 1] = alpaca_record(human, gpt)
    source = tmp_path / "alpaca_data.json"
    source.write_text(json.dumps(records))
    sample.main(["--source", str(source), "--output-dir", str(tmp_path / "out")])
    for name in ("train", "val"):
        written = json.loads((tmp_path / "out" / f"alpaca-{name}-10k.json").read_text())
        assert written == expected[name]
        length_rows = read_json(PAPER_DATA / f"alpaca-{name}-10k-length.json", "paper lengths")
        length_ids = [row["id"] for row in length_rows]
        assert [item["id"] for item in written] == length_ids


def test_split_needs_enough_records(tmp_path, capsys):
    source = tmp_path / "tiny.json"
    source.write_text(json.dumps([{"instruction": "x", "input": "", "output": "y"}] * 10))
    from src.common.utils import UserError

    with pytest.raises(UserError, match="cannot draw two splits"):
        sample.main(["--source", str(source), "--output-dir", str(tmp_path)])


def test_construct_answers_the_bucket_of_l_max(small_data, tmp_path):
    data, lengths = small_data
    rows = json.loads(lengths.read_text())
    rows[0]["L_t0.7"] = 51  # 'a': L_max 51 -> bucket 100
    lengths.write_text(json.dumps(list(reversed(rows))))  # joined by id, not by position
    output = tmp_path / "instruct.json"
    construct.main(["--data-path", str(data), "--length-path", str(lengths), "--output-path", str(output)])
    written = json.loads(output.read_text())
    answers = {item["id"]: item["conversations"][1]["value"] for item in written}
    assert answers == {"a": "100", "b": "50", "c": "50", "d": "50", "e": "50", "f": "50"}
    assert [item["id"] for item in written] == list(SMALL_LENGTHS)
    prompt = load_conversations(data)[0].prompt
    assert written[0]["conversations"][0]["value"] == f"{prompt}\n{QUERY_PROMPT}"
