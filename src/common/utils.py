"""Small shared helpers: the error a user's mistake raises, atomic JSON I/O (plain or .json.gz), seeding,
device and dtype choice, and a timer.

torch and transformers are imported inside the functions that need them, so that the pure parts of
the project (the scheduler, the data files, the dry-run metrics) import in milliseconds.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any


class UserError(Exception):
    """A mistake in the user's input: reported as one line, exit status 2, no traceback."""


# the clone: what ships in it (the paper's data, the predictor) is found from any working directory
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def user_cache_dir() -> Path:
    """The project's folder in the user's cache, for what a run builds or measures once and keeps wherever it is
    started from (converted models, device costs): $XDG_CACHE_HOME, else ~/.cache, then length-scheduling/."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "length-scheduling"


def project_path(relative: str) -> str:
    """A path of the clone as a default flag value: as written when the command runs in the clone (as help and
    records have always shown it), else the absolute path, so that a command run from elsewhere finds the same file."""
    try:
        in_clone = Path.cwd().resolve() == PROJECT_ROOT
    except OSError:  # a working directory that was deleted
        in_clone = False
    return relative if in_clone else str(PROJECT_ROOT / relative)


# --------------------------------------------------------------------------- JSON files


# The paper's data ships gzip-compressed (data/*.json.gz); every JSON path may name either form.
GZIP_SUFFIX = ".gz"
# plain files already reported as shadowing a .gz copy, so that each is reported once per process
_SHADOWS_NOTED: set[str] = set()


def resolve_json_path(path: str | os.PathLike) -> Path:
    """`x.json` as given if it exists, else its compressed copy `x.json.gz` if that exists.

    A plain file beside the shipped `.json.gz` (one a user regenerated, say) therefore takes precedence."""
    path = Path(path)
    if not path.name.endswith(".json"):
        return path
    compressed = path.with_name(path.name + GZIP_SUFFIX)
    if not path.exists():
        return compressed if compressed.is_file() else path
    if compressed.is_file() and str(path) not in _SHADOWS_NOTED:  # say it once: a partial copy would mislead quietly
        _SHADOWS_NOTED.add(str(path))
        print(
            f"note: reading {path}, not the {compressed.name} beside it (delete {path.name} to read that)",
            file=sys.stderr,
        )
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
        raise UserError(f"{what} {path} is not a complete gzip file: make or download it again") from None


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike):
    """A binary stream to write `path` through: a temporary file in the same folder, synced and renamed into place
    when the block ends, removed if it raises; readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        share_with_umask(Path(temporary))
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write through `atomic_file`. A name ending in `.gz` gets gzip-compressed text (no time stamp inside: the same
    text, the same bytes)."""
    with atomic_file(path) as stream:
        data = text.encode("utf-8")
        stream.write(gzip.compress(data, mtime=0) if Path(path).name.endswith(GZIP_SUFFIX) else data)


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


def exchange_paths(first: Path, second: Path) -> bool:
    """Swap two existing paths in one step (Linux's renameat2 with RENAME_EXCHANGE), so that a reader finds one or
    the other there at every moment, never neither; False where the system cannot (the caller then renames twice)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:  # a C library older than glibc 2.28
        return False
    at_current_folder, rename_exchange = -100, 2
    done = renameat2(at_current_folder, os.fsencode(first), at_current_folder, os.fsencode(second), rename_exchange)
    return done == 0


def replace_folder(staging: Path, folder: Path) -> None:
    """Put `staging` where `folder` is: a reader finds the old folder or the new one, never half of each. On Linux the
    two are swapped in one step; elsewhere by two renames, where a kill between them leaves no folder there and the
    old one beside it as `.NAME.old-*`."""
    import shutil
    import tempfile

    if not folder.exists():
        staging.rename(folder)
        return
    if exchange_paths(staging, folder):
        shutil.rmtree(staging, ignore_errors=True)  # the old folder, now under the staging name
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
    aside.rmdir()
    folder.rename(aside)
    staging.rename(folder)
    shutil.rmtree(aside, ignore_errors=True)


def current_umask() -> int:
    """The process's umask: read from /proc where Linux shows it, else set and set back (for a moment, files that
    another thread creates would get mode 0)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0)
    os.umask(umask)
    return umask


def share_with_umask(path: Path) -> None:
    """mkstemp and mkdtemp make a file or folder private (0600, 0700), and so does safetensors: give `path` (and a
    folder's contents) the modes that the user's umask allows, as a plain open() would have."""
    umask = current_umask()
    path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
    if path.is_dir():
        for inner in path.rglob("*"):
            inner.chmod((0o777 if inner.is_dir() else 0o666) & ~umask)


def partial_path(output: str | os.PathLike) -> Path:
    """Where a command keeps what it has finished until its output is complete: the output's name + `.partial`."""
    return Path(f"{output}.partial")


def path_fingerprint(path: str | os.PathLike | None) -> str | None:
    """The sha256 of a file's bytes, or of every file of a folder (names and bytes), so that a resumed run can tell
    that an input changed under the same name; None for no path or nothing there. A `.json` name that ships as
    `.json.gz` is read as the shipped file."""
    import hashlib

    if not path:
        return None
    path = resolve_json_path(path) if str(path).endswith(".json") else Path(path)
    if not path.exists():
        return None
    digest = hashlib.sha256()
    for member in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if member.is_file():
            digest.update(str(member.relative_to(path) if path.is_dir() else member.name).encode() + b"\0")
            with open(member, "rb") as handle:
                for block in iter(lambda handle=handle: handle.read(1 << 22), b""):
                    digest.update(block)
    return digest.hexdigest()
