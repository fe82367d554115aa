"""Shared fixtures: a tiny random LLaMA saved as a model folder, small data files, the paper's shipped data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj, indent=2))
    return path


@pytest.fixture(scope="session", autouse=True)
def cost_cache_of_the_session(tmp_path_factory):
    """src.infer's default plan keeps each device's measured costs in $XDG_CACHE_HOME: the tests keep theirs in a
    folder of the session (every subprocess inherits it), never in the user's cache."""
    import os

    earlier = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    if earlier is None:
        del os.environ["XDG_CACHE_HOME"]
    else:
        os.environ["XDG_CACHE_HOME"] = earlier


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer LLaMA with random weights and the real LLaMA sentencepiece vocabulary (from mistral-common)."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    from src.common.models import llama_tokenizer_file

    folder = tmp_path_factory.mktemp("tiny-llama")
    shutil.copy(llama_tokenizer_file(), folder / "tokenizer.model")
    tokenizer = LlamaTokenizer.from_pretrained(folder, add_bos_token=True)
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    import torch

    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def eos_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with its EOS logit made 2.5x larger: greedy answers then end, at lengths that vary from
    prompt to prompt (4 or 9 tokens under the vicuna template), instead of never ending."""
    import torch
    from transformers import LlamaForCausalLM, LlamaTokenizer

    folder = tmp_path_factory.mktemp("eos-llama")
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.lm_head.weight[model.config.eos_token_id] *= 2.5
    model.save_pretrained(folder)
    LlamaTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from src.common.models import load_model

    model, tokenizer, _ = load_model(str(tiny_model_dir), "cpu", "float32")
    return model, tokenizer


def cli_args(**flags) -> list[str]:
    """`cli_args(model=path, max_length=8)` -> ["--model", "path", "--max-length", "8"]; True gives a bare flag."""
    argv = []
    for name, value in flags.items():
        argv.append("--" + name.replace("_", "-"))
        if value is not True:
            argv.append(str(value))
    return argv


# Known lengths for the small hand-checked cases: ids in data order, with lengths that
# straddle the caps used in the tests.
SMALL_LENGTHS = {"a": 3, "b": 10, "c": 1, "d": 6, "e": 2, "f": 8}


@pytest.fixture
def small_data(tmp_path) -> tuple[Path, Path]:
    """A conversation file and its length file (L_t0.0 = SMALL_LENGTHS; L_max adds 1 at T=0.7 for 'a')."""
    conversations = [
        {
            "id": sample_id,
            "conversations": [
                {"from": "human", "value": f"Question {sample_id}?"},
                {"from": "gpt", "value": "An answer."},
            ],
        }
        for sample_id in SMALL_LENGTHS
    ]
    rows = [
        {"id": sample_id, "L_gt": 4, "L_t0.0": length, "L_t0.3": length, "L_t0.5": length, "L_t0.7": length}
        for sample_id, length in SMALL_LENGTHS.items()
    ]
    data = write_json(tmp_path / "small.json", conversations)
    lengths = write_json(tmp_path / "small-length.json", rows)
    return data, lengths


PROJECT = Path(__file__).resolve().parents[1]
# The paper's Alpaca files ship in data/ as .json.gz; they are read under their plain .json names.
PAPER_DATA = PROJECT / "data"


def torchrun(module: str, argv: list[str], processes: int = 2) -> list[str]:
    """The command that runs `python -m module argv` in `processes` CPU processes under torchrun (gloo)."""
    import sys

    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    return [*launcher, "-m", module, *argv]


def run_command(command: list[str], timeout: float = 300):
    """Run a CLI from the project root; a failure shows its stderr."""
    import subprocess

    done = subprocess.run(command, cwd=PROJECT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done
