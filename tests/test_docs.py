"""The front door: README stays short, every link in README and docs/ leads somewhere, and every command README
prints names a real module, preset and flags."""

from __future__ import annotations

import contextlib
import importlib
import io
import re
import shlex
import subprocess

import pytest

from .conftest import PROJECT

README = PROJECT / "README.md"
PAGES = [README, *sorted((PROJECT / "docs").glob("*.md"))]
README_LIMIT_BYTES = 12_000
FENCED = re.compile(r"```.*?```", re.S)


def heading_anchors(page) -> set[str]:
    """GitHub's anchors: lower case, punctuation dropped, spaces to hyphens, a repeated one numbered."""
    anchors, seen = set(), {}
    for heading in re.findall(r"^#{1,6} +(.+?)\s*$", FENCED.sub("", page.read_text()), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def test_readme_is_short():
    assert len(README.read_bytes()) <= README_LIMIT_BYTES


@pytest.mark.parametrize("page", PAGES, ids=[page.name for page in PAGES])
def test_every_relative_link_and_anchor_resolves(page):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", FENCED.sub("", page.read_text())):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        destination = (page.parent / path).resolve() if path else page
        if not destination.exists() or (anchor and anchor not in heading_anchors(destination)):
            broken.append(target)
    assert broken == []


def readme_commands() -> list[list[str]]:
    """Each command of README's fenced blocks, as words, comments and `&&` chains split off."""
    commands = []
    for block in re.findall(r"```(?:bash)?\n(.*?)```", README.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for command in line.split("&&"):
                words = shlex.split(command, comments=True)
                if words:
                    commands.append(words)
    return commands


def help_text(module: str) -> str:
    """What `python -m src.MODULE --help` prints, without a process of its own."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), pytest.raises(SystemExit):
        importlib.import_module(f"src.{module}").main(["--help"])
    return printed.getvalue()


def test_readme_commands_name_real_modules_presets_and_flags():
    train_sh_help = subprocess.run(["bash", "train.sh", "--help"], cwd=PROJECT, capture_output=True, text=True).stdout
    checked, problems = 0, []
    for words in readme_commands():
        if words[:2] == ["python", "-m"] and words[2].startswith("src."):
            module, flags = words[2].removeprefix("src."), words[3:]
        elif words[:2] == ["bash", "train.sh"]:
            module, flags = "train_lora", words[2:]
            if flags and not flags[0].startswith("-"):
                preset = flags.pop(0)
                if not re.search(rf"^  {preset} ", train_sh_help, re.M):
                    problems.append(f"train.sh has no preset {preset}")
        elif words[:3] == ["pip", "install", "-r"] or words[:4] == ["pip", "install", "--no-deps", "-r"]:
            if not (PROJECT / words[-1]).is_file():
                problems.append(f"no {words[-1]}")
            continue
        else:
            continue
        if not (PROJECT / "src" / f"{module}.py").is_file():
            problems.append(f"no module src.{module}")
            continue
        listed = help_text(module)
        problems += [f"src.{module} has no {flag}" for flag in flags if flag.startswith("--") and flag not in listed]
        checked += 1
    assert problems == []
    assert checked >= 10  # the reproduce commands, the Quickstart, the paper's pipeline
