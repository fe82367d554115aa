"""What every command-line entry point shares: `run_cli` (a user's mistake becomes one line and exit status 2), the
help format, and the checks of numbers and output paths that run before any work. The model's flags are in
src.running.setup, the length predictors' in src.predictors.flags."""

from __future__ import annotations

import argparse
import errno
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .distributed import end_processes
from .utils import UserError


def run_cli(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> None:
    """Run a CLI's `main`, turning a UserError into one line on stderr and exit status 2."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name.startswith(("src.", "benchmarks.")):  # usage lines name the command as typed
        sys.argv[0] = f"python -m {spec.name}"
    try:
        main(argv)
    except UserError as error:
        end_processes(finished=False)
        if os.environ.get("RANK", "0") == "0":  # under a launcher every process meets the same mistake: say it once
            print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except OSError as error:
        end_processes(finished=False)
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" writing {error.filename}" if error.filename else ""
        print(
            f"error: the disk is full{where} ({error.strerror}): free some space, then run the same command again; "
            "it keeps what was finished and written",
            file=sys.stderr,
        )
        sys.exit(1)
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


def add_num_data_draw_argument(parser) -> None:
    """--num-data of the commands that draw their samples as upstream did (src.eval takes the first rows instead)."""
    parser.add_argument(
        "--num-data",
        type=int,
        default=None,
        help="a random draw of this many samples, seeded by --seed, as upstream (src.eval takes the first rows "
        "instead); default all",
    )


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


# The lowest sampling temperature: logits divided by less overflow float32 into NaN draws, and below it sampling is
# greedy in all but name; 0 is greedy decoding.
MIN_SAMPLING_TEMPERATURE = 1e-3


def temperature_problem(value: float) -> str | None:
    """Why a temperature cannot run (None when it can): 0 is greedy; sampling needs MIN_SAMPLING_TEMPERATURE."""
    if not math.isfinite(value):
        return f"must be a finite number, got {value}"
    if value < 0:
        return f"must be at least 0, got {value}"
    if 0 < value < MIN_SAMPLING_TEMPERATURE:
        return f"must be 0 (greedy) or at least {MIN_SAMPLING_TEMPERATURE:g}, got {value:g}"
    return None


def check_temperature(flag: str, value: float | None) -> None:
    problem = None if value is None else temperature_problem(value)
    if problem:
        raise UserError(f"{flag} {problem}")


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


def _same_file(first: str | Path, second: str | Path) -> bool:
    first, second = Path(first), Path(second)
    if first.exists() and second.exists():
        return os.path.samefile(first, second)
    return first.resolve() == second.resolve()


def _inside(path: str | Path, folder: str | Path) -> bool:
    """`path` lies in `folder` (at any depth), which is a folder or a path a run will make into one."""
    return Path(folder).resolve() in Path(path).resolve().parents


def check_outputs_are_not_inputs(outputs: dict, inputs: dict, output_folders: dict | None = None) -> None:
    """Before any work: no output flag names the file of an input flag or of an earlier output flag, nor a path inside
    an input folder (a model, adapter, predictor or answers folder) or inside an output folder (`output_folders`, flag
    -> folder, checked first against the inputs); flag -> path, None: not given. So no run writes over what it reads
    or over what it writes elsewhere."""
    named = dict(inputs)
    for out_flag, out_path in {**(output_folders or {}), **outputs}.items():
        for in_flag, in_path in named.items():
            if not (out_path and in_path):
                continue
            if _same_file(out_path, in_path):
                if in_flag in inputs:
                    raise UserError(f"{out_flag} {out_path} is the {in_flag} file; choose another {out_flag}")
                raise UserError(f"{out_flag} and {in_flag} name the same file; choose another {out_flag}")
            if (Path(in_path).is_dir() or in_flag in (output_folders or {})) and _inside(out_path, in_path):
                raise UserError(
                    f"{out_flag} {out_path} lies inside the {in_flag} folder {in_path}: choose a path outside it"
                )
        named[out_flag] = out_path
