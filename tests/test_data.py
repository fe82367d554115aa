"""Data files, the upstream sample draw, prompts and atomic writes."""

from __future__ import annotations

import gzip
import hashlib
import json
import re

import pytest

from src.common.data import (
    default_length_path,
    load_conversations,
    load_length_file,
    max_over_temperatures,
    select_samples,
)
from src.common.prompts import PIA_PROMPT, VICUNA_TEMPLATE, PromptFormatter, choose_template
from src.common.utils import UserError, read_json, resolve_json_path, write_json_atomic

from .conftest import PAPER_DATA, PROJECT

# The paper's four files as data/README.md records them: name -> (JSON bytes, sha256 of the JSON).
CHECKSUM_ROW = re.compile(r"^\| `(alpaca-[a-z0-9-]+\.json\.gz)` \| (\d+) \| `([0-9a-f]{64})` \|$", re.M)


def recorded_checksums() -> dict[str, tuple[int, str]]:
    text = (PROJECT / "data" / "README.md").read_text(encoding="utf-8")
    return {name: (int(size), digest) for name, size, digest in CHECKSUM_ROW.findall(text)}


def test_shipped_paper_files_decode_to_the_recorded_json():
    """Each data/*.json.gz decompresses to exactly the bytes whose size and sha256 data/README.md records."""
    recorded = recorded_checksums()
    assert sorted(recorded) == [
        "alpaca-train-10k-length.json.gz",
        "alpaca-train-10k.json.gz",
        "alpaca-val-10k-length.json.gz",
        "alpaca-val-10k.json.gz",
    ]
    assert sorted(path.name for path in PAPER_DATA.glob("alpaca-*.json.gz")) == sorted(recorded)
    for name, (size, digest) in recorded.items():
        raw = gzip.decompress((PAPER_DATA / name).read_bytes())
        assert len(raw) == size, name
        assert hashlib.sha256(raw).hexdigest() == digest, name


def test_plain_names_find_the_compressed_files_and_a_plain_copy_wins(tmp_path, capsys):
    rows = [{"id": "1", "L_t0.0": 5}]
    compressed = tmp_path / "x-length.json.gz"
    compressed.write_bytes(gzip.compress(json.dumps(rows).encode()))
    assert resolve_json_path(tmp_path / "x-length.json") == compressed
    assert read_json(tmp_path / "x-length.json", "length file") == rows
    assert read_json(compressed, "length file") == rows
    (tmp_path / "x-length.json").write_text(json.dumps([{"id": "2", "L_t0.0": 7}]))
    capsys.readouterr()
    assert load_length_file(tmp_path / "x-length.json", ("L_t0.0",)) == {"2": {"id": "2", "L_t0.0": 7}}
    assert load_length_file(tmp_path / "x-length.json", ("L_t0.0",)) == {"2": {"id": "2", "L_t0.0": 7}}
    # a partial copy beside the shipped file would change what is measured: said once, on stderr
    assert capsys.readouterr().err.count("not the x-length.json.gz beside it") == 1


def test_a_gz_name_is_written_compressed_and_reads_back(tmp_path):
    rows = [{"id": "1", "L_t0.0": 5}]
    write_json_atomic(tmp_path / "out.json.gz", rows)
    write_json_atomic(tmp_path / "again.json.gz", rows)
    assert json.loads(gzip.decompress((tmp_path / "out.json.gz").read_bytes())) == rows
    assert (tmp_path / "out.json.gz").read_bytes() == (tmp_path / "again.json.gz").read_bytes()  # no time stamp
    assert read_json(tmp_path / "out.json", "length file") == rows


def test_a_cut_gzip_file_is_a_user_error(tmp_path):
    whole = gzip.compress(json.dumps([{"id": str(i)} for i in range(200)]).encode())
    (tmp_path / "cut.json.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(UserError, match=r"cut.json.gz is not a complete gzip file"):
        read_json(tmp_path / "cut.json", "data file")
    (tmp_path / "text.json.gz").write_text("[]")
    with pytest.raises(UserError, match="not a complete gzip file"):
        read_json(tmp_path / "text.json.gz", "data file")


def test_default_length_path_as_upstream():
    assert default_length_path("./data/alpaca-val-10k.json") == "./data/alpaca-val-10k-length.json"
    # a compressed data file names the plain length file, which is what src.lenpred writes and readers resolve
    assert default_length_path("data/alpaca-val-10k.json.gz") == "data/alpaca-val-10k-length.json"


def test_select_samples_matches_upstream_draw(small_data):
    samples = load_conversations(small_data[0])
    # np.random.seed(7); np.random.permutation(6) begins 3, 5, 0, 2 (upstream's draw)
    assert [sample.id for sample in select_samples(samples, 4, 7)] == ["d", "f", "a", "c"]
    assert [sample.id for sample in select_samples(samples, None, 7)] == [sample.id for sample in samples]


def test_duplicate_ids_rejected(tmp_path):
    from .conftest import write_json

    path = write_json(tmp_path / "dup.json", [{"id": "1", "conversations": [{"from": "human", "value": "x"}]}] * 2)
    with pytest.raises(UserError, match="appears twice"):
        load_conversations(path)


def test_length_file_fields_checked(tmp_path):
    from .conftest import write_json

    path = write_json(tmp_path / "l.json", [{"id": "1", "L_t0.0": "many"}])
    with pytest.raises(UserError, match="no integer L_t0.0"):
        load_length_file(path, ("L_t0.0",))


def test_paper_validation_draw():
    """The paper's 1024 samples: the vanilla average of the real lengths is the one its tables build on."""
    samples = load_conversations(PAPER_DATA / "alpaca-val-10k.json")
    table = load_length_file(PAPER_DATA / "alpaca-val-10k-length.json", ("L_t0.0",))
    assert [sample.id for sample in samples] == list(table)
    chosen = select_samples(samples, 1024, 42)
    assert len({sample.id for sample in chosen}) == 1024
    assert max(max_over_temperatures(table[sample.id]) for sample in chosen) == 514


def test_vicuna_prompt_and_suffix(tiny_model):
    _, tokenizer = tiny_model
    formatter = PromptFormatter(tokenizer, VICUNA_TEMPLATE)
    text = formatter.text("Name a color.", PIA_PROMPT)
    assert text.endswith(f"USER: Name a color.\n{PIA_PROMPT} ASSISTANT:")
    assert formatter.encode("Name a color.")[0] == tokenizer.bos_token_id


def test_template_choice():
    class WithTemplate:
        chat_template = "{{ messages }}"

    class Without:
        chat_template = None

    assert choose_template("./ckpts/vicuna-7b", WithTemplate()) == VICUNA_TEMPLATE
    assert choose_template("ckpts/smollm2", WithTemplate()) == "chat_template"
    assert choose_template("ckpts/llama", Without()) == VICUNA_TEMPLATE
    assert choose_template("ckpts/llama", Without(), "one_shot") == "one_shot"


def test_unknown_template(tiny_model):
    with pytest.raises(UserError, match="unknown --conv-template"):
        PromptFormatter(tiny_model[1], "no-such-template")


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / "out.json"
    write_json_atomic(path, {"a": 1})

    class Unserialisable:
        pass

    with pytest.raises(TypeError):
        write_json_atomic(path, {"a": Unserialisable()})
    assert path.read_text().strip() == '{\n    "a": 1\n}'
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_clis_find_the_shipped_data_without_path_flags(tmp_path, monkeypatch):
    """As the paper prints its commands: no --data-path, the defaults name data/*.json and the .json.gz is read."""
    from src import benchmark, construct, eval

    monkeypatch.chdir(PROJECT)
    instruct = tmp_path / "instruct.json"
    written = construct.main(["--output-path", str(instruct)])  # data/alpaca-train-10k.json and its length file
    assert len(written) == 10000 and written[0]["id"] == "5"  # the first id drawn into train
    metrics = eval.main(["--strategy", "gt", "--plot", str(tmp_path / "gt.png")])  # first 1000 val rows
    # the oracle is exact but for the few val rows above 512 tokens (up to 514), clamped to --max-length 512
    assert metrics["num_samples"] == 1000 and metrics["acc_50"] == 1 and metrics["error"] < 0.1
    output = benchmark.main(["--dry-run", "--replay-lengths", "data/alpaca-val-10k-length.json", "--num-data", "256"])
    (vanilla,) = output["results"]
    assert output["args"]["data_path"] == "data/alpaca-val-10k.json"
    assert round(vanilla["average_length"], 2) == 334.69  # the 256-sample draw of README's CPU and GPU tables


def test_the_benchmark_reads_every_shape_that_src_infer_reads(tmp_path):
    """Besides the paper's FastChat list, a request file of prompts (JSON lines) or of Alpaca records (a JSON list)
    gives one sample per record, its id or line number its id; a request src.infer would answer with an error line,
    or one of several turns, refuses the file naming its line and id."""
    from src.common.data import load_conversations
    from src.common.prompts import alpaca_human_turn

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "a", "prompt": "Name a color."}\n\n{"prompt": "Say hi."}\n')
    assert [(sample.id, sample.prompt) for sample in load_conversations(prompts)] == [
        ("a", "Name a color."),
        ("3", "Say hi."),  # line 3: the blank line keeps its number
    ]
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "Add.", "input": "2 and 3"}]))
    assert [(sample.id, sample.prompt) for sample in load_conversations(alpaca)] == [
        ("1", alpaca_human_turn("Add.", "2 and 3"))
    ]
    for record, message in (
        ({"id": "e", "prompt": " "}, "line 1 \\(id e\\): empty prompt"),
        (
            {"id": "s", "body": {"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}]}},
            "2 turns",
        ),
    ):
        broken = tmp_path / "broken.jsonl"
        broken.write_text(json.dumps(record) + "\n")
        with pytest.raises(UserError, match=message):
            load_conversations(broken)
