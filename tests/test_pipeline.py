"""`python -m src.pipeline`: the paper's length-perception pipeline as one command, end to end and resumable."""

from __future__ import annotations

import json
import sys

import pytest

from src import pipeline
from src.common.utils import UserError

from .conftest import run_command


def test_the_pipeline_runs_every_step_then_a_rerun_runs_none(eos_model_dir, tmp_path, capsys):
    work = tmp_path / "pipeline"
    command = [sys.executable, "-m", "src.pipeline", "--model", str(eos_model_dir), "--device", "cpu"]
    command += ["--train-rows", "8", "--val-rows", "4", "--max-length", "8", "--epochs", "1"]
    command += ["--output-dir", str(work)]
    first = run_command(command, timeout=600).stdout
    assert [row["id"] for row in json.loads((work / "val.json").read_text())] == [
        row["id"] for row in json.loads((work / "val-length.json").read_text())
    ]
    assert len(json.loads((work / "train-instruct.json").read_text())) == 8
    assert (work / "adapter" / "adapter_config.json").is_file()
    log = json.loads((work / "pipeline.json").read_text())
    assert len(log["steps"]) == 7 and all(step["seconds"] > 0 for step in log["steps"].values())
    seqsch = json.loads((work / "eval-seqsch.json").read_text())
    assert seqsch["num_samples"] == 4
    assert "| constant (the train median) |" in first and "| seqsch (the LoRA adapter) |" in first
    assert "| vanilla |" in first and "| seqsch+vbs+fcr |" in first
    # the train rows' median L_max is the constant predictor's length
    lengths = sorted(
        max(row[key] for key in row if key.startswith("L_t"))
        for row in json.loads((work / "train-length.json").read_text())
    )
    constant = json.loads((work / "eval-constant.json").read_text())
    assert set(constant["predictions"].values()) == {round((lengths[3] + lengths[4]) / 2)}

    # the rerun and the refusal start no step: in this process, two interpreter starts fewer
    again = pipeline.main(command[3:])
    assert again["steps"] == log["steps"] and capsys.readouterr().out.count("done before") == 7
    with pytest.raises(UserError, match="holds a pipeline run with other settings"):
        pipeline.main([*command[3:-2], "--max-length", "16", *command[-2:]])
