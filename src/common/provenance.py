"""What names a published figure's run (src.tables): the command, the commit, the date, the machine and the library
versions, recorded by every benchmark beside its results."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path


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
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}


def machine_description(device: str) -> str:
    """The machine a figure was measured on, in words: the GPU's name and memory, or the CPU's model and cores."""
    if device.startswith("cuda"):
        import torch

        properties = torch.cuda.get_device_properties(torch.device(device))
        return f"{properties.name}, {properties.total_memory / 2**30:.0f} GiB"
    model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == "model name":
                model = value.strip()
                break
    except OSError:
        pass
    return f"{model or platform.processor() or 'CPU'}, {os.cpu_count()} cores"


def provenance(device: str = "cpu") -> dict:
    """What names a published figure's run: the command as typed, the commit (with `+changes` when the tree differed
    from it), the UTC date and time, the machine and the library versions."""
    import subprocess
    from datetime import datetime, timezone

    project = Path(__file__).resolve().parents[2]  # the checkout this code runs from, wherever the command runs

    def git(*arguments: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *arguments], capture_output=True, text=True, timeout=10, check=True, cwd=project
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD")
    if commit is not None and git("status", "--porcelain", "--untracked-files=no"):
        commit += "+changes"
    module = getattr(sys.modules.get("__main__"), "__spec__", None)
    program = f"python -m {module.name}" if module is not None else f"python {sys.argv[0]}"
    return {
        "command": " ".join([program, *sys.argv[1:]]),
        "commit": commit,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_description(device),
        **library_versions(),
    }
