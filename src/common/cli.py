"""What every command-line entry point shares: `run_cli` (a user's mistake becomes one line and exit status 2)
and the argument groups of the model and of the length predictors."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..engines.registry import AUTO_ENGINE, DEFAULT_ENGINE, ENGINES
from .distributed import end_processes
from .models import SMOLLM2_ALIAS, VICUNA_SHAPE_ALIAS, check_adapter_path, check_model_name
from .utils import UserError, resolve_device


def run_cli(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> None:
    """Run a CLI's `main`, turning a UserError into one line on stderr and exit status 2."""
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


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Every command's --help: its docstring as written, and each flag's default where it has one (and its help does
    not already say it)."""

    def _get_help_string(self, action):
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


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
        "--engine",
        default=DEFAULT_ENGINE,
        choices=[AUTO_ENGINE, *sorted(ENGINES)],
        help="how the model runs (src/engines/registry.py): transformers = eager generate and its continuous "
        "batching; compiled = a static KV cache and torch.compile (CUDA graphs on a GPU); auto = compiled on CUDA, "
        "transformers elsewhere",
    )
    parser.add_argument(
        "--conv-template",
        default=None,
        help="fastchat template name, or chat_template for the tokenizer's own; "
        "default: vicuna_v1.1 for Vicuna models, else the tokenizer's chat template",
    )


def add_num_data_draw_argument(parser) -> None:
    """--num-data of the commands that draw their samples as upstream did (src.eval takes the first rows instead)."""
    parser.add_argument(
        "--num-data",
        type=int,
        default=None,
        help="a random draw of this many samples, seeded by --seed, as upstream (src.eval takes the first rows "
        "instead); default all",
    )


def check_model_arguments(args, needs_model: bool = True) -> None:
    """Before any load: --model names a model's folder (when the command will load one) and --lora-path an adapter."""
    if needs_model:
        check_model_name("--model", args.model)
    check_adapter_path("--lora-path", getattr(args, "lora_path", None))


def add_predictor_arguments(parser) -> None:
    """The flags of the length predictors that src.benchmark and src.eval share."""
    from ..predictors.proxy import SHIPPED_PROXY_PATH

    parser.add_argument(
        "--prediction-batch-size", type=int, default=128, help="prompts per length-prediction batch (po, seqsch)"
    )
    parser.add_argument("--constant-length", type=int, default=None, help="the length of strategy constant")
    parser.add_argument(
        "--predictor-path",
        default=SHIPPED_PROXY_PATH,
        help="folder of a proxy predictor (python -m src.train_proxy or src.fit_proxy); default: the one that ships, "
        "trained on Vicuna-7B's lengths",
    )


def check_predictor_arguments(args) -> None:
    """The ranges of the flags `add_predictor_arguments` adds (not given: passes)."""
    check_range("--prediction-batch-size", args.prediction_batch_size, 1)
    check_range("--constant-length", args.constant_length, 1)


def predictor_context(args):
    """The PredictorContext of a CLI's parsed flags (`add_predictor_arguments`, --max-length, --length-path,
    --device, and --gt-field where the CLI has it); the model is attached once it is loaded."""
    from ..predictors.registry import PredictorContext

    return PredictorContext(
        max_length=args.max_length,
        length_path=args.length_path,
        options={
            "prediction_batch_size": args.prediction_batch_size,
            "constant_length": args.constant_length,
            "gt_field": getattr(args, "gt_field", None),
            "predictor_path": args.predictor_path,
            "predictor_device": resolve_device(args.device),
        },
    )


def attach_model_if_needed(args, context, strategy: str) -> str:
    """Load the model, its formatter and its engine into `context` when the predictor generates (po, seqsch), from
    the model flags; returns the device the predictions run on (the proxy's own, else the CPU)."""
    from ..predictors.registry import PREDICTORS

    if not PREDICTORS[strategy].needs_model:
        return context.options["predictor_device"] if strategy == "proxy" else "cpu"
    from ..engines.registry import build_engine
    from .models import load_model_and_formatter

    model, tokenizer, formatter, _ = load_model_and_formatter(
        args.model, args.device, args.dtype, getattr(args, "lora_path", None), args.load_format, args.conv_template
    )
    context.model, context.tokenizer, context.formatter = model, tokenizer, formatter
    context.engine = build_engine(args.engine, model, tokenizer)
    return str(model.device)


# --------------------------------------------------------------------------- checks before any work

# numpy's seed range (the sample draw seeds numpy)
MAX_SEED = 2**32 - 1


def check_range(flag: str, value, low=None, high=None, *, open_low: bool = False, open_high: bool = False) -> None:
    """A numeric flag outside its range is one line naming the flag and the range; None (not given) passes, and NaN
    or an infinity, which every comparison would let through, is refused."""
    if value is None:
        return
    if not math.isfinite(value):
        raise UserError(f"{flag} must be a finite number, got {value}")
    too_low = low is not None and (value <= low if open_low else value < low)
    too_high = high is not None and (value >= high if open_high else value > high)
    if too_low or too_high:
        left = "" if low is None else f"{'above' if open_low else 'at least'} {low}"
        right = "" if high is None else f"{'below' if open_high else 'at most'} {high}"
        raise UserError(f"{flag} must be {' and '.join(part for part in (left, right) if part)}, got {value}")


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")


def _check_can_create(flag: str, path: Path) -> None:
    """The folders above `path` exist or can be made, and the nearest existing one is a writable folder."""
    existing = _nearest_existing(path.parent if path.parent != Path("") else Path("."))
    if not existing.is_dir():
        raise UserError(f"{flag} {path}: {existing} is a file, so no folder can be made there; choose another path")
    if not os.access(existing, os.W_OK):
        raise UserError(f"{flag} {path}: {existing} cannot be written; choose a folder you can write to")


def check_output_file(flag: str, path) -> None:
    """Before any work: the file that `flag` names can be written (not a folder, in a folder that exists or can
    be made, writable). Nothing is created."""
    if path is None:
        return
    text, path = str(path), Path(path)
    if path.is_dir() or text.endswith(("/", os.sep)):
        raise UserError(f"{flag} {path} is a folder: name a file, e.g. {path / 'result.json'}")
    if path.exists() and not os.access(path, os.W_OK):
        raise UserError(f"{flag} {path} cannot be written; choose another file")
    _check_can_create(flag, path)


def check_output_dir(flag: str, path) -> None:
    """Before any work: the folder that `flag` names is a folder, or can be made, and can be written."""
    if path is None:
        return
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file: name a folder")
    if path.is_dir():
        if not os.access(path, os.W_OK):
            raise UserError(f"{flag} {path} cannot be written; choose a folder you can write to")
        return
    _check_can_create(flag, path)
