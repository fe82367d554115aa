"""Bad inputs, as users make them: every one is refused before any work with exit status 2 and one line on stderr
naming the flag or file and the fix, no traceback, and nothing written or changed."""

from __future__ import annotations

import json

import pytest

from src import benchmark, construct, lenpred, plots, predict, reproduce, sample, train_lora, train_proxy
from src import eval as length_eval
from src.common.cli import run_cli

from .conftest import SMALL_LENGTHS

# (command, arguments with {tmp} for the test's folder, words the error line must contain)
CASES = [
    # output locations, checked before any work
    (benchmark, "--dry-run {replay} --output-json {tmp}/folder", "--output-json {tmp}/folder is a folder"),
    (benchmark, "--dry-run {replay} --output-json {tmp}/folder/", "is a folder"),
    (benchmark, "--dry-run {replay} --output-json {tmp}/a-file/out.json", "a-file is a file"),
    (length_eval, "--strategy gt {data} --output-json {tmp}/folder", "--output-json"),
    (length_eval, "--strategy gt {data} --plot {tmp}/a-file/plot.png", "--plot"),
    (lenpred, "{data} --output-path {tmp}/folder", "--output-path"),
    (construct, "{data} --output-path {tmp}/folder", "--output-path"),
    (sample, "--source {tmp}/alpaca.json --output-dir {tmp}/a-file", "--output-dir {tmp}/a-file is a file"),
    (plots, "--input {tmp}/result.json --output-dir {tmp}/a-file", "--output-dir"),
    (reproduce, "dry --runs-dir {tmp}/a-file", "--runs-dir"),
    (reproduce, "dry --images-dir {tmp}/a-file/imgs", "--images-dir"),
    (train_proxy, "--data_path {tmp}/small.json --output_dir {tmp}/a-file", "--output_dir"),
    # counts, sizes, lengths, seeds, quantiles: each with its range
    (benchmark, "--dry-run {replay} --max-length 0 --output-json {tmp}/out.json", "--max-length must be at least 1"),
    (benchmark, "--dry-run {replay} --batch-size 0", "--batch-size must be at least 1"),
    (benchmark, "--dry-run {replay} --group-size -1", "--group-size must be at least 1"),
    (benchmark, "--dry-run {replay} --num-data 0", "--num-data must be at least 1"),
    (benchmark, "--dry-run {replay} --slots 0", "--slots must be at least 1"),
    (benchmark, "--dry-run {replay} --seed -1", "--seed must be at least 0 and at most 4294967295"),
    (benchmark, "--dry-run {replay} --temperature -0.5", "--temperature must be at least 0"),
    (benchmark, "--dry-run {replay} --fcr-quantile 1.5", "--fcr-quantile must be above 0 and below 1, got 1.5"),
    (benchmark, "--dry-run {replay} --fcr-retry-quantiles 0.8 1", "--fcr-retry-quantiles must be above 0 and below 1"),
    (benchmark, "--dry-run {replay} --fcr-retry-quantiles high", "--fcr-retry-quantiles expected levels"),
    (benchmark, "--dry-run {replay} --strategies gt+resume", "+resume continues FCR's failures, so it needs +fcr"),
    (benchmark, "--dry-run {replay} --strategies gt+fcr --fcr-retry-quantiles 0.8", "none is asked for"),
    (benchmark, "--dry-run {replay} --prediction-batch-size 0", "--prediction-batch-size"),
    (benchmark, "--dry-run {replay} --strategy constant --constant-length 0", "--constant-length"),
    (benchmark, "--dry-run {replay} --vbs-table 50:x", "--vbs-table"),
    (length_eval, "--strategy gt {data} --num-data 0", "--num-data must be at least 1"),
    (length_eval, "--strategy gt {data} --max-length -5", "--max-length must be at least 1, got -5"),
    (lenpred, "{data} --batch-size 0", "--batch-size"),
    (lenpred, "{data} --temperatures 0.0 -1", "--temperatures must be at least 0, got -1.0"),
    (sample, "--source {tmp}/alpaca.json --split-size 0", "--split-size"),
    # (an output folder in {tmp}: a check that let this through would otherwise overwrite ckpts/proxy-minilm)
    (train_proxy, "--data_path {tmp}/small.json --output_dir {tmp}/proxy --holdout -1", "--holdout"),
    (train_proxy, "--data_path {tmp}/small.json --output_dir {tmp}/proxy --ranking_weight -1", "--ranking_weight"),
    (train_proxy, "--data_path {tmp}/small.json --output_dir {tmp}/proxy --auxiliary_weight -1", "--auxiliary_weight"),
    (train_proxy, "--data_path {tmp}/small.json --output_dir {tmp}/proxy --target_field L_t9", "L_t9"),
    # checks that used to run after earlier results were written
    (benchmark, "--dry-run {replay} --strategies vanilla gt+fcr --fcr-quantile 0.8 --output-json {tmp}/out.json", "gt"),
    (benchmark, "--dry-run {replay} --strategies vanilla gt+fcr+resume --fcr-retry-quantiles 0.8", "quantiles (proxy)"),
    (benchmark, "--dry-run {replay} --strategy po", "needs a model"),
    (benchmark, "--dry-run", "--dry-run needs --replay-lengths"),
    # input files
    (benchmark, "--dry-run --data-path {tmp}/missing.json --replay-lengths {tmp}/small-length.json", "not found"),
    (benchmark, "--dry-run --data-path {tmp}/duplicate.json {replay_only}", "appears twice"),
    (benchmark, "--dry-run --data-path {tmp}/no-id.json {replay_only}", "not in FastChat format"),
    (benchmark, "--dry-run --data-path {tmp}/broken.json {replay_only}", "is not valid JSON"),
    (benchmark, "--dry-run {data} --replay-lengths {tmp}/other-length.json", "lacks 1 id(s)"),
    (construct, "{data} --length-path {tmp}/missing-length.json", "length file not found"),
    (plots, "--input {tmp}/missing.json", "benchmark output not found"),
    (plots, "--input {tmp}/small.json", "holds no benchmark results"),
    (plots, "--input {tmp}/lacking.json", "result 'vanilla' lacks effective_token_ratio"),
    (train_lora, "--data_path {tmp}/small.json --output_dir {tmp}/out --lora_r 0", "--lora_r must be at least 1"),
    (train_lora, "--data_path {tmp}/small.json --output_dir {tmp}/out --lora_dropout 1", "--lora_dropout"),
    (reproduce, "tpu", "unknown part 'tpu'"),
    (predict, "{data} --strategy gt --output {tmp}/folder", "--output {tmp}/folder is a folder"),
    (predict, "{data} --strategy gt --output {tmp}/out.jsonl --chunk-size 0", "--chunk-size must be at least 1"),
    (predict, "{data} --strategy oracle --output {tmp}/out.jsonl", "unknown strategy 'oracle'"),
    (predict, "--data-path {tmp}/broken.json --strategy gt --output {tmp}/out.jsonl", "is not valid JSON"),
    (benchmark, "--dry-run {replay} --slots many", "expected a number of slots or auto"),
    (benchmark, "--dry-run {replay} --arrival-rate 0.1 --strategies continuous gt", "'gt' is a static strategy"),
    (benchmark, "--dry-run {replay} --arrival-rate 0", "--arrival-rate must be above 0"),
    (benchmark, "{data} --arrival-rate 0.1 --strategies continuous", "--arrival-rate runs in the dry run only"),
    # NaN and infinities, which every comparison lets through
    (benchmark, "--dry-run {replay} --arrival-rate nan --strategies continuous", "--arrival-rate must be a finite"),
    (benchmark, "--dry-run {replay} --aging nan", "--aging must be a finite number, got nan"),
    (benchmark, "--dry-run {replay} --fcr-quantile nan", "--fcr-quantile must be a finite number"),
    (benchmark, "{data} --temperature inf", "--temperature must be a finite number, got inf"),
    (lenpred, "{data} --temperatures 0.0 nan", "--temperatures must be a finite number"),
    (train_proxy, "--data_path {tmp}/small.json --output_dir {tmp}/proxy --quantiles 0.5 nan", "finite"),
    (benchmark, "--dry-run {replay} --fcr-retry-quantiles 0.8 nan", "--fcr-retry-quantiles"),
    # models, adapters and training folders, checked before any model loads
    (benchmark, "{data} --model {tmp}/folder", "no config.json"),
    (lenpred, "{data} --model {tmp}/folder", "no config.json"),
    (length_eval, "--strategy seqsch {data} --model smollm2-135m --lora-path {tmp}/folder", "no LoRA adapter there"),
    (length_eval, "--strategy seqsch {data} --model smollm2-135m", "--lora-path ./ckpts/vicuna-response-length"),
    (predict, "{data} --strategy seqsch --model smollm2-135m --lora-path {tmp}/folder --output {tmp}/o.jsonl", "LoRA"),
    (train_lora, "--model_name_or_path {tmp}/folder --output_dir {tmp}/out", "no config.json"),
    (
        train_lora,
        "--model_name_or_path smollm2-135m --data_path {tmp}/missing.json --output_dir {tmp}/out",
        "not found",
    ),
    (train_lora, "--model_name_or_path smollm2-135m --data_path {tmp}/small.json --output_dir {tmp}/done", "finished"),
]


@pytest.fixture
def workspace(small_data, tmp_path):
    data, lengths = small_data
    (tmp_path / "folder").mkdir()
    (tmp_path / "a-file").write_text("not a folder")
    records = json.loads(data.read_text())
    (tmp_path / "duplicate.json").write_text(json.dumps(records + records[:1]))
    (tmp_path / "no-id.json").write_text(json.dumps([{"conversations": [{"from": "human", "value": "x"}]}]))
    (tmp_path / "broken.json").write_text('[{"id": "a", ')
    rows = [row for row in json.loads(lengths.read_text()) if row["id"] != "f"]
    (tmp_path / "other-length.json").write_text(json.dumps(rows))
    (tmp_path / "alpaca.json").write_text(json.dumps([{"instruction": "x", "input": "", "output": "y"}] * 30))
    (tmp_path / "result.json").write_text(json.dumps({"results": []}))
    lacking = {"results": [{"strategy": "vanilla", "dry_run": True, "batches": [], "mean_latency_steps": 1.0}]}
    (tmp_path / "lacking.json").write_text(json.dumps(lacking))
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / train_lora.ARGUMENTS_FILE).write_text("{}")  # a finished adapter's folder
    return tmp_path


def snapshot(folder) -> dict:
    return {str(path): (path.stat().st_size, path.stat().st_mtime_ns) for path in sorted(folder.rglob("*"))}


@pytest.mark.parametrize(
    ("command", "arguments", "expected"), CASES, ids=[f"{c.__name__[4:]}:{a}" for c, a, _ in CASES]
)
def test_bad_input_is_one_line_and_exit_2_and_nothing_written(workspace, capsys, command, arguments, expected):
    tmp = str(workspace)
    fields = {
        "tmp": tmp,
        "data": f"--data-path {tmp}/small.json",
        "replay": f"--data-path {tmp}/small.json --replay-lengths {tmp}/small-length.json",
        "replay_only": f"--replay-lengths {tmp}/small-length.json",
    }
    argv = arguments.format(**fields).split()
    before = snapshot(workspace)
    with pytest.raises(SystemExit) as stopped:
        run_cli(command.main, argv)
    assert stopped.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert expected.format(**fields) in lines[0]
    assert "Traceback" not in lines[0]
    assert snapshot(workspace) == before


def test_the_small_data_is_valid_so_the_cases_fail_for_their_own_reason(workspace, capsys):
    """Each case above changes one thing of a run that works."""
    tmp = str(workspace)
    output = benchmark.main(
        ["--dry-run", "--data-path", f"{tmp}/small.json", "--replay-lengths", f"{tmp}/small-length.json"]
    )
    assert [row["id"] for row in output["results"][0]["samples"]] == list(SMALL_LENGTHS)
