"""Bad inputs, as users make them: every one is refused before any work with exit status 2 and one line on stderr
naming the flag or file and the fix, no traceback, and nothing written or changed."""

from __future__ import annotations

import gzip
import json

import pytest

from src import (
    benchmark,
    construct,
    fit_proxy,
    infer,
    lenpred,
    plots,
    predict,
    reproduce,
    sample,
    train_lora,
    train_proxy,
)
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
    (benchmark, "--dry-run {replay} --temperature 1e-40", "--temperature must be 0 (greedy) or at least 0.001"),
    (infer, "--input {tmp}/requests.jsonl --output {tmp}/o.jsonl --temperature 1e-9", "0 (greedy) or at least 0.001"),
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
    (train_proxy, "--data_path {tmp}/small.json --output_dir {tmp}/proxy --quantiles 0.5 nan 0.9", "finite"),
    (train_proxy, "--data_path {tmp}/small.json --output_dir {tmp}/p --learning_rate nan", "--learning_rate must be a"),
    (train_proxy, "--data_path {tmp}/small.json --output_dir {tmp}/p --num_train_epochs -1", "must be above 0, got -1"),
    (train_proxy, "--data_path {tmp}/small.json --output_dir {tmp}/p --per_device_train_batch_size 0", "at least 1"),
    (train_lora, "--model_name_or_path smollm2-135m --output_dir {tmp}/out --learning_rate nan", "--learning_rate"),
    (
        train_lora,
        "--model_name_or_path smollm2-135m --output_dir {tmp}/out --gradient_accumulation_steps 0",
        "at least",
    ),
    # text that is no text: a cut gzip stream, a lone surrogate escape where an id must be written back
    (infer, "--input {tmp}/cut.jsonl.gz --output {tmp}/o.jsonl", "is not a complete gzip file"),
    (fit_proxy, "--input {tmp}/cut.jsonl.gz --output-dir {tmp}/fitted --model smollm2-135m", "not a complete gzip"),
    (
        fit_proxy,
        "--input {tmp}/completion.jsonl --output-dir {tmp}/f --num-data 2 --holdout 1 --model smollm2-135m",
        "line 1: fit",
    ),
    (infer, "--input {tmp}/surrogate.jsonl --output {tmp}/o.jsonl", "line 1: the id holds a lone surrogate"),
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
    # an output that names an input would overwrite it
    (benchmark, "--dry-run {replay} --output-json {tmp}/small-length.json", "is the --replay-lengths file"),
    (benchmark, "--dry-run {replay} --output-json {tmp}/small.json", "is the --data-path file"),
    (benchmark, "--dry-run {data} --replay-lengths {tmp}/lengths.json --output-json {tmp}/lengths.json", "--replay"),
    (predict, "{data} --strategy gt --output {tmp}/small.json", "--output {tmp}/small.json is the --data-path file"),
    (predict, "{data} --strategy gt --output {tmp}/small-length.json", "is the --length-path file"),
    (length_eval, "--strategy gt {data} --plot {tmp}/small.json", "--plot {tmp}/small.json is the --data-path file"),
    (length_eval, "--strategy gt {data} --output-json {tmp}/small-length.json", "is the --length-path file"),
    (length_eval, "--strategy gt {data} --plot {tmp}/p.png --calibration-plot {tmp}/p.png", "name the same file"),
    (lenpred, "{data} --output-path {tmp}/small.json", "--output-path {tmp}/small.json is the --data-path file"),
    (construct, "{data} --output-path {tmp}/small.json", "is the --data-path file"),
    (construct, "{data} --output-path {tmp}/small-length.json", "is the --length-path file"),
    (infer, "--input {tmp}/requests.jsonl --output {tmp}/requests.jsonl", "is the --input file"),
    (infer, "--input {tmp}/requests.jsonl --output {tmp}/o.jsonl --summary-json {tmp}/o.jsonl", "name the same file"),
    # an output inside a folder the run reads (a model, a predictor) or writes (the answers)
    (
        infer,
        "--input {tmp}/requests.jsonl --output {tmp}/o.jsonl --predictor-path {tmp}/folder "
        "--summary-json {tmp}/folder/proxy_config.json",
        "--summary-json {tmp}/folder/proxy_config.json lies inside the --predictor-path folder {tmp}/folder",
    ),
    (infer, "--input {tmp}/requests.jsonl --model {tmp}/folder --output {tmp}/folder/a.jsonl", "the --model folder"),
    (benchmark, "{data} --model {tmp}/folder --output-json {tmp}/folder/config.json", "inside the --model folder"),
    (
        benchmark,
        "{data} --answers-dir {tmp}/answers --output-json {tmp}/answers/vanilla.jsonl",
        "--output-json {tmp}/answers/vanilla.jsonl lies inside the --answers-dir folder {tmp}/answers",
    ),
    (predict, "{data} --strategy gt --model {tmp}/folder --output {tmp}/folder/p.jsonl", "inside the --model folder"),
    # an output file that holds what no run of this command wrote is never cut or appended to
    (infer, "--input {tmp}/requests.jsonl --output {tmp}/mine.jsonl", "mine.jsonl holds lines that no src.infer run"),
    (infer, "--input {tmp}/requests.jsonl --output {tmp}/trailer.jsonl", "trailer.jsonl line 2 is not an answer line"),
    # what would be silently dropped or run otherwise
    (infer, "--input {tmp}/requests.jsonl --output {tmp}/o.jsonl --strategy vanilla+fcr", "vanilla is the unscheduled"),
    (benchmark, "--dry-run {replay} --strategies vanilla+vbs", "+vbs, +fcr and +resume need a predictor"),
    (infer, "--input {tmp}/requests.jsonl --output {tmp}/o.jsonl --predictor-path {tmp}/nope", "no proxy predictor in"),
    (infer, "--input {tmp}/requests.jsonl --output {tmp}/o.jsonl.gz", "appended as plain JSON lines"),
    (
        infer,
        "--input {tmp}/requests.jsonl --output {tmp}/o.jsonl --model smollm2-135m --strategy file "
        "--predictions-path {tmp}/twice.jsonl",
        "--predictions-path {tmp}/twice.jsonl: id 'r1' appears twice",
    ),
    (
        infer,
        "--input {tmp}/requests.jsonl --output {tmp}/o.jsonl --model smollm2-135m --strategy file "
        "--predictions-path {tmp}/levels.jsonl",
        "levels.jsonl line 1 is not a prediction line",
    ),
    # length files: lengths are whole numbers of tokens, at least 0, one row per id
    (length_eval, "--strategy gt {data} --length-path {tmp}/negative.json", "has L_t0.3 = -3"),
    (length_eval, "--strategy gt {data} --length-path {tmp}/fractional.json", "has L_t0.3 = 2.5"),
    (length_eval, "--strategy gt {data} --length-path {tmp}/boolean.json", "has L_t0.3 = true"),
    (length_eval, "--strategy gt {data} --length-path {tmp}/repeated.json", "id a appears twice"),
    (benchmark, "--dry-run {data} --replay-lengths {tmp}/repeated.json", "id a appears twice"),
    (benchmark, "--dry-run {data} --replay-lengths {tmp}/negative.json --strategy gt", "has L_t0.3 = -3"),
    (benchmark, "--dry-run {replay} --strategy gt --length-path {tmp}/fractional.json", "has L_t0.3 = 2.5"),
    (predict, "{data} --strategy gt --length-path {tmp}/boolean.json --output {tmp}/o.jsonl", "has L_t0.3 = true"),
    (construct, "{data} --length-path {tmp}/negative.json --output-path {tmp}/i.json", "has L_t0.3 = -3"),
    # an interrupted run's files: resumed only by the same command, and refused when damaged
    (benchmark, "--dry-run {replay} --output-json {tmp}/other.json", "holds results of other flags"),
    (benchmark, "--dry-run {replay} --output-json {tmp}/damaged.json", "damaged.json.partial is damaged"),
    (predict, "{data} --strategy gt --output {tmp}/torn.jsonl", "torn.jsonl.partial line 1 is not a prediction line"),
    (predict, "{data} --strategy gt --output {tmp}/lengthless.jsonl", "line 1 is not a prediction line"),
    (predict, "{data} --strategy gt --output {tmp}/unsettled.jsonl", "made with other settings (unreadable)"),
    (predict, "{data} --strategy proxy --predictor-path {tmp}/folder --output {tmp}/o.jsonl", "{tmp}/folder"),
    # flags that make no sense, each refused with its range
    (benchmark, "--dry-run {replay} --aging inf", "--aging must be a finite number, got inf"),
    (benchmark, "--dry-run {replay} --vbs-table auto", "cannot run with --dry-run"),
    (benchmark, "--dry-run {replay} --answers-dir {tmp}/answers", "a dry run generates none"),
    (benchmark, "--dry-run {replay} --strategies continuous+vbs", "do not apply to continuous batching"),
    (benchmark, "--dry-run {replay} --strategies continuous:nope", "unknown predictor 'nope'"),
    (benchmark, "--dry-run {replay} --strategies gt+turbo", "unknown strategy modifier 'turbo'"),
    (infer, "--input {tmp}/requests.jsonl --output {tmp}/o.jsonl --top-p nan", "--top-p must be a finite number"),
    (infer, "--input {tmp}/requests.jsonl --output {tmp}/o.jsonl --temperature -1", "--temperature must be at least"),
    (infer, "--input {tmp}/requests.jsonl --output {tmp}/o.jsonl --vbs-table 60:4", "multiples of 50"),
    (infer, "--input {tmp}/requests.jsonl --output {tmp}/o.jsonl --vbs-table auto", "src.infer takes a table"),
    (predict, "{data} --strategy file --predictions-path {tmp}/p.jsonl --output {tmp}/p.jsonl", "--predictions-path"),
    (
        infer,
        "--input {tmp}/requests.jsonl --output {tmp}/o.jsonl --strategy file --predictions-path {tmp}/p.jsonl "
        "--model smollm2-135m",
        "lacks 1 id(s)",
    ),
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
    (tmp_path / "lengths.json").write_text(lengths.read_text())
    for name, value in (("negative", -3), ("fractional", 2.5), ("boolean", True)):
        bad = json.loads(lengths.read_text())
        bad[0]["L_t0.3"] = value  # a column that no flag names: the oracle's L_max reads it
        (tmp_path / f"{name}.json").write_text(json.dumps(bad))
    (tmp_path / "repeated.json").write_text(json.dumps(json.loads(lengths.read_text()) * 2))
    (tmp_path / "requests.jsonl").write_text('{"id": "r1", "prompt": "Say hi."}\n')
    whole = gzip.compress(('{"id": "r1", "prompt": "Say hi."}\n' * 50).encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    completion = {"custom_id": "c", "url": "/v1/completions", "body": {"prompt": "Once"}}
    (tmp_path / "completion.jsonl").write_text(json.dumps(completion) + "\n")
    (tmp_path / "surrogate.jsonl").write_text('{"id": "r\\ud800", "prompt": "Say hi."}\n')
    (tmp_path / "mine.jsonl").write_text('{"important": true}\n')
    (tmp_path / "twice.jsonl").write_text('{"id": "r1", "predicted_length": 3}\n' * 2)
    (tmp_path / "levels.jsonl").write_text('{"id": "r1", "predicted_length": 3, "quantiles": {"nan": 4}}\n')
    (tmp_path / "trailer.jsonl").write_text('{"id": "r1", "text": "Hi."}\n{"summary": 1}\n')
    (tmp_path / "trailer.jsonl.settings.json").write_text("{}")
    (tmp_path / "other.json.partial").write_text(json.dumps({"flags": {"max_length": 99}, "results": []}))
    (tmp_path / "damaged.json.partial").write_text('{"flags": ')
    (tmp_path / "torn.jsonl.partial").write_text('{"id": "a", "predic\n{"id": "b", "predicted_length": 3}\n')
    (tmp_path / "lengthless.jsonl.partial").write_text('{"id": "a"}\n{"id": "b", "predicted_length": 3}\n')
    (tmp_path / "unsettled.jsonl.partial").write_text('{"id": "a", "predicted_length": 3}\n')
    (tmp_path / "unsettled.jsonl.partial.settings.json").write_text('{"strategy": ')
    (tmp_path / "p.jsonl").write_text('{"id": "a", "predicted_length": 3}\n')  # predictions for ids r1 lack
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
