"""`python -m src.infer` started from another folder than the clone: the shipped predictor is found (not the
file-order fallback), and nothing but the named output lands in the working folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from .conftest import PROJECT
from .test_infer import QUESTIONS


def test_src_infer_run_from_another_folder_finds_the_shipped_predictor(eos_model_dir, tmp_path):
    work = tmp_path / "elsewhere"
    work.mkdir()
    (work / "in.jsonl").write_text("".join(json.dumps({"prompt": text}) + "\n" for text in QUESTIONS[:4]))
    environment = os.environ | {"PYTHONPATH": str(PROJECT), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "src.infer", "--input", "in.jsonl", "--output", "out.jsonl", "--model"]
    command += [str(eos_model_dir), "--max-length", "8", "--batch-size", "2", "--device-profile", "cpu"]
    command += ["--summary-json", "summary.json"]
    done = subprocess.run(command, cwd=work, capture_output=True, text=True, env=environment, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((work / "summary.json").read_text())
    assert summary["strategy"] == "continuous:proxy"  # the cpu profile's cheapest plan, with the shipped predictor
    assert sorted(path.name for path in work.iterdir()) == [
        "in.jsonl",
        "out.jsonl",
        "out.jsonl.settings.json",
        "summary.json",
    ]
    assert len((work / "out.jsonl").read_text().splitlines()) == 4
