"""Length perception: answer parsing, the po and seqsch predictors, src.eval and LoRA training."""

from __future__ import annotations

import json

import pytest
import torch

from src import construct, train_lora
from src import eval as length_eval
from src.common.data import load_conversations
from src.common.prompts import QUERY_PROMPT, VICUNA_TEMPLATE, PromptFormatter
from src.common.utils import UserError
from src.engines.generate import generate_batch
from src.engines.registry import build_engine
from src.predictors.registry import PredictorContext, build_predictor, parse_length_answer
from src.scheduling.metrics import length_metrics

from .conftest import SMALL_LENGTHS, cli_args


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("150", 150),
        (" 150</s>", 150),
        ("About 120 tokens", 120),
        ("120-150", 135),
        ("Estimated number of tokens: 1,200\nHere is my answer with 3 points", 1200),
        ("\n\n  80\nThe answer is 5", 80),
        ("I cannot predict", None),
        ("I cannot predict\n100", None),  # only the first non-empty line counts
        ("", None),
    ],
)
def test_length_answer_parsing(answer, expected):
    assert parse_length_answer(answer) == expected


def test_construct_prompt_equals_inference_prompt(tiny_model, small_data, tmp_path):
    _, tokenizer = tiny_model
    data, lengths = small_data
    instruct = construct.main(
        ["--data-path", str(data), "--length-path", str(lengths), "--output-path", str(tmp_path / "i.json")]
    )
    formatter = PromptFormatter(tokenizer, VICUNA_TEMPLATE)
    for sample, item in zip(load_conversations(data), instruct, strict=True):
        assert formatter.text(item["conversations"][0]["value"]) == formatter.text(sample.prompt, QUERY_PROMPT)


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("adapter")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lora = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, lora).save_pretrained(folder)
    return folder


def test_seqsch_predicts_once_per_id_and_leaves_adapter_disabled(tiny_model_dir, adapter_dir, small_data):
    from src.common.models import load_model

    model, tokenizer, _ = load_model(str(tiny_model_dir), "cpu", "float32", adapter=str(adapter_dir))
    base, _, _ = load_model(str(tiny_model_dir), "cpu", "float32")
    formatter = PromptFormatter(tokenizer, VICUNA_TEMPLATE)
    samples = load_conversations(small_data[0])
    context = PredictorContext(
        max_length=64,
        model=model,
        tokenizer=tokenizer,
        formatter=formatter,
        engine=build_engine("transformers", model, tokenizer),
        options={"prediction_batch_size": 4},
    )
    predictor = build_predictor("seqsch", context)
    predictions = predictor.predict(samples)
    assert list(predictions) == list(SMALL_LENGTHS)
    assert all(1 <= value <= 64 for value in predictions.values())
    # what an unparsable answer becomes is checked with scripted answers below
    prompt = [formatter.encode(samples[0].prompt)]
    with_adapter_off = generate_batch(model, tokenizer, prompt, 6, replay_lengths=[6])
    assert with_adapter_off[0].token_ids == generate_batch(base, tokenizer, prompt, 6, replay_lengths=[6])[0].token_ids


class ScriptedEngine:
    """An engine whose answers are written out here, so the expected predictions are known by hand."""

    def __init__(self, answers: list[str]):
        self.answers = list(answers)

    def generate(self, prompts, max_new_tokens, temperature=0.0, replay_lengths=None):
        from src.engines.generate import GeneratedSample

        batch, self.answers = self.answers[: len(prompts)], self.answers[len(prompts) :]
        return [GeneratedSample(len(text.split()), True, text, []) for text in batch]


def test_unparsable_answers_get_the_max_length_and_are_counted(tiny_model, small_data):
    """Upstream crashed on an answer without a number; here it is counted and the sample may run to the max."""
    model, tokenizer = tiny_model
    answers = ["About 120 tokens", "I cannot say", "120-150", "", "7", "Many, many tokens"]
    context = PredictorContext(
        max_length=100,
        model=model,
        tokenizer=tokenizer,
        formatter=PromptFormatter(tokenizer, VICUNA_TEMPLATE),
        engine=ScriptedEngine(answers),
        options={"prediction_batch_size": 4},
    )
    predictor = build_predictor("po", context)
    predictions = predictor.predict(load_conversations(small_data[0]))
    # 120 and 135 are clamped to the max length 100; three answers hold no number
    assert predictions == {"a": 100, "b": 100, "c": 100, "d": 100, "e": 7, "f": 100}
    assert predictor.unparsable == 3


def test_seqsch_without_adapter_is_a_clear_error(tiny_model):
    from src.common.utils import UserError

    model, tokenizer = tiny_model
    with pytest.raises(UserError, match="--lora-path"):
        build_predictor("seqsch", PredictorContext(max_length=8, model=model, tokenizer=tokenizer))


def test_length_metrics_by_hand():
    metrics = length_metrics([100, 200, 50], [120, 350, 50])
    assert metrics["error"] == pytest.approx((20 + 150 + 0) / 3)
    assert metrics["acc_50"] == pytest.approx(2 / 3)
    assert metrics["acc_100"] == pytest.approx(2 / 3)
    assert metrics["bucket_accuracy"] == pytest.approx(1 / 3)
    assert metrics["kendall_tau"] == pytest.approx(1.0)
    assert metrics["spearman"] == pytest.approx(1.0)


def test_eval_cli_with_the_oracle(small_data, tmp_path):
    data, lengths = small_data
    output, plot = tmp_path / "eval.json", tmp_path / "scatter.png"
    length_eval.main(
        [
            "--strategy",
            "gt",
            "--data-path",
            str(data),
            "--length-path",
            str(lengths),
            "--num-data",
            "5",
            "--max-length",
            "8",
            "--output-json",
            str(output),
            "--plot",
            str(plot),
        ]
    )
    saved = json.loads(output.read_text())
    for name in (
        "num_samples",
        "error",
        "acc_50",
        "acc_100",
        "kendall_tau",
        "spearman",
        "bucket_accuracy",
        "unparsable",
        "seconds_per_1000",
    ):
        assert name in saved
    assert saved["num_samples"] == 5
    assert saved["error"] == pytest.approx(2 / 5)  # 'b' (L_max 10) is clamped to the max length 8
    assert plot.stat().st_size > 0


def test_constant_baseline_and_fewer_temperatures(small_data, tmp_path):
    """A length file with one temperature works: L_max is the largest column present."""
    data, lengths = small_data
    rows = [{"id": row["id"], "L_gt": 0, "L_t0.0": row["L_t0.0"]} for row in json.loads(lengths.read_text())]
    lengths.write_text(json.dumps(rows))
    metrics = length_eval.main(
        [
            "--strategy",
            "constant",
            "--constant-length",
            "4",
            "--data-path",
            str(data),
            "--length-path",
            str(lengths),
            "--plot",
            str(tmp_path / "p.png"),
        ]
    )
    targets = list(SMALL_LENGTHS.values())
    assert metrics["error"] == pytest.approx(sum(abs(4 - t) for t in targets) / len(targets))
    assert metrics["kendall_tau"] == 0.0


def test_labels_cover_only_the_answer():
    input_ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 2, 2]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])  # pad id 2 is also the end token
    labels = train_lora.build_labels(input_ids, attention_mask, [3, 2])
    assert labels.tolist() == [[-100, -100, -100, 8, 9], [-100, -100, 7, 2, -100]]


def test_training_lowers_the_loss_and_saves_a_loadable_adapter(tiny_model_dir, small_data, tmp_path):
    data, lengths = small_data
    instruct = tmp_path / "instruct.json"
    construct.main(["--data-path", str(data), "--length-path", str(lengths), "--output-path", str(instruct)])
    output_dir = tmp_path / "adapter"
    trainer = train_lora.main(
        [
            "--model_name_or_path",
            str(tiny_model_dir),
            "--data_path",
            str(instruct),
            "--output_dir",
            str(output_dir),
            "--max_steps",
            "12",
            "--learning_rate",
            "0.02",
            "--per_device_train_batch_size",
            "6",
            "--logging_steps",
            "1",
            "--lora_r",
            "4",
            "--use_cpu",
            "True",
            "--report_to",
            "none",
            "--save_strategy",
            "no",
        ]
    )
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < losses[0] - 0.1  # a random tiny model starts near ln(vocabulary) and learns slowly
    assert (output_dir / "adapter_config.json").is_file()
    from src import benchmark

    argv = cli_args(
        model=tiny_model_dir,
        device="cpu",
        data_path=data,
        replay_lengths=lengths,
        lora_path=output_dir,
        strategy="seqsch",
        max_length=8,
        batch_size=2,
        fcr=True,
    )
    result = benchmark.main(argv)["results"][0]
    assert result["strategy"] == "seqsch+fcr" and result["num_samples"] == 6


@pytest.mark.parametrize("preset", ["paper", "cpu"])
def test_train_sh_presets_parse(preset):
    """Every flag that `bash train.sh --help` shows a preset passing is one that src.train_lora accepts."""
    import shlex
    import subprocess
    from pathlib import Path

    from transformers import HfArgumentParser, TrainingArguments

    shown = subprocess.run(
        ["bash", "train.sh", "--help"], cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True
    )
    assert shown.returncode == 0
    line = next(line for line in shown.stdout.splitlines() if line.strip().startswith(preset + " "))
    argv = shlex.split(line[line.index("-m src.train_lora") + len("-m src.train_lora") :])
    parser = HfArgumentParser(
        (
            train_lora.ModelArguments,
            train_lora.DataArguments,
            train_lora.LoraArguments,
            train_lora.RunArguments,
            TrainingArguments,
        )
    )
    if preset == "paper":
        argv = [arg if arg != "--bf16" else "--fp16" for arg in argv]  # parse-only: this CPU has no bf16 training
        argv[argv.index("--fp16") + 1] = "False"
    parsed = parser.parse_args_into_dataclasses(args=argv)
    assert parsed[-1].num_train_epochs == 3
    assert parsed[-1].save_strategy == "steps"  # an interrupted run keeps its checkpoints


def lora_weights(folder) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


class Killed(Exception):
    """Stands for a kill of the training process."""


def train_killed_after_step(monkeypatch, step: int, argv: list[str]) -> None:
    """`train_lora.main(argv)`, stopped right after it saved its checkpoint of `step`."""
    from transformers import Trainer

    save_checkpoint = Trainer._save_checkpoint

    def save_then_die(self, *args, **kwargs):
        save_checkpoint(self, *args, **kwargs)
        if self.state.global_step == step:
            raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "_save_checkpoint", save_then_die)
        with pytest.raises(Killed):
            train_lora.main(argv)


def train_counting_steps(monkeypatch, argv: list[str]) -> tuple:
    """(the trainer of `train_lora.main(argv)`, the numbers of the optimizer steps it ran)."""
    from transformers import Trainer

    steps_run = []
    training_step = Trainer.training_step

    def count_step(self, *args, **kwargs):
        steps_run.append(self.state.global_step + 1)
        return training_step(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "training_step", count_step)
        trainer = train_lora.main(argv)
    return trainer, steps_run


def four_step_argv(model_dir, instruct, output_dir, seed: str = "3") -> list[str]:
    """train_lora for 4 steps on the tiny model, a checkpoint every 2."""
    return [
        *("--model_name_or_path", str(model_dir), "--data_path", str(instruct)),
        *("--output_dir", str(output_dir), "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2"),
        *("--learning_rate", "0.02", "--per_device_train_batch_size", "2", "--lora_r", "4", "--seed", seed),
        *("--use_cpu", "True", "--report_to", "none", "--logging_steps", "1"),
    ]


def test_training_interrupted_after_a_checkpoint_resumes_there(tiny_model_dir, small_data, tmp_path, monkeypatch):
    """A run stopped right after its step-2 checkpoint, started again with the same command, trains steps 3 and 4
    only, and ends with the weights of a run that was never stopped; a finished folder is then refused."""
    data, lengths = small_data
    instruct = tmp_path / "instruct.json"
    construct.main(["--data-path", str(data), "--length-path", str(lengths), "--output-path", str(instruct)])

    def argv(output_dir):
        return four_step_argv(tiny_model_dir, instruct, output_dir)

    whole = train_lora.main(argv(tmp_path / "whole"))
    assert whole.state.global_step == 4

    train_killed_after_step(monkeypatch, 2, argv(tmp_path / "cut"))
    assert (tmp_path / "cut" / "checkpoint-2").is_dir()
    assert not (tmp_path / "cut" / train_lora.ARGUMENTS_FILE).exists()

    resumed, steps_run = train_counting_steps(monkeypatch, argv(tmp_path / "cut"))
    assert steps_run == [3, 4] and resumed.state.global_step == 4
    saved = json.loads((tmp_path / "cut" / train_lora.ARGUMENTS_FILE).read_text())
    assert saved["resumed_from"].endswith("checkpoint-2")
    expected, got = lora_weights(tmp_path / "whole"), lora_weights(tmp_path / "cut")
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name])

    from src.common.utils import UserError

    with pytest.raises(UserError, match="holds a finished adapter"):
        train_lora.main(argv(tmp_path / "cut"))


def test_a_resume_with_another_lora_shape_or_other_examples_is_refused(
    tiny_model_dir, small_data, tmp_path, monkeypatch
):
    """Checkpoints continue only the training that saved them: a rerun with another --lora_r, or on an instruction
    file whose examples differ, is refused before the model loads, naming what changed; the checkpoint stays."""
    from src.common.utils import UserError

    data, lengths = small_data
    instruct, other = tmp_path / "instruct.json", tmp_path / "other.json"
    construct.main(["--data-path", str(data), "--length-path", str(lengths), "--output-path", str(instruct)])
    records = json.loads(instruct.read_text())
    records[0]["conversations"][1]["value"] = "999"  # one answer edited
    other.write_text(json.dumps(records))
    adapter = tmp_path / "adapter"
    train_killed_after_step(monkeypatch, 2, four_step_argv(tiny_model_dir, instruct, adapter))
    wider = [*four_step_argv(tiny_model_dir, instruct, adapter), "--lora_r", "8"]
    with pytest.raises(UserError, match="another training \\(--lora_r was 4, now 8\\)"):
        train_lora.main(wider)
    with pytest.raises(UserError, match="another training \\(the training examples' sha256 was"):
        train_lora.main(four_step_argv(tiny_model_dir, other, adapter))
    assert sorted(path.name for path in adapter.glob("checkpoint-*")) == ["checkpoint-2"]


def test_overwrite_interrupted_keeps_the_finished_adapter_and_resumes(
    tiny_model_dir, small_data, tmp_path, monkeypatch
):
    """--overwrite over a finished adapter, stopped right after its step-2 checkpoint, leaves that adapter as it was
    (weights and marker); the same command again trains steps 3 and 4 only and ends with the weights of a run that
    was never stopped, in --output_dir, with nothing left beside it."""
    data, lengths = small_data
    instruct = tmp_path / "instruct.json"
    construct.main(["--data-path", str(data), "--length-path", str(lengths), "--output-path", str(instruct)])

    def argv(output_dir, seed):
        return [*four_step_argv(tiny_model_dir, instruct, output_dir, seed), "--overwrite", "True"]

    adapter, reference = tmp_path / "adapter", tmp_path / "reference"
    train_lora.main(argv(adapter, "3"))  # the finished adapter that the next command replaces
    train_lora.main(argv(reference, "5"))  # the replacement, never stopped
    first = lora_weights(adapter)
    first_marker = (adapter / train_lora.ARGUMENTS_FILE).read_text()

    train_killed_after_step(monkeypatch, 2, argv(adapter, "5"))
    assert (adapter / train_lora.ARGUMENTS_FILE).read_text() == first_marker
    for name, tensor in lora_weights(adapter).items():
        torch.testing.assert_close(tensor, first[name])
    assert (tmp_path / "adapter.replacing" / "checkpoint-2").is_dir()

    _, steps_run = train_counting_steps(monkeypatch, argv(adapter, "5"))
    assert steps_run == [3, 4]
    assert not (tmp_path / "adapter.replacing").exists()
    saved = json.loads((adapter / train_lora.ARGUMENTS_FILE).read_text())
    assert saved["training"]["output_dir"] == str(adapter) and saved["training"]["seed"] == 5
    expected, got = lora_weights(reference), lora_weights(adapter)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name])
    assert any(not torch.equal(got[name], first[name]) for name in got)  # the other seed's adapter, not the first


def test_overwrite_killed_after_its_swap_never_puts_the_old_adapter_back(
    tiny_model_dir, small_data, tmp_path, monkeypatch
):
    """--overwrite killed after the swap, before the old adapter (now `<output_dir>.replacing`) is deleted: the same
    command again deletes it and trains anew, instead of resuming from the old run's checkpoints and swapping the
    old adapter back over the new one."""
    from src.common import utils

    data, lengths = small_data
    instruct = tmp_path / "instruct.json"
    construct.main(["--data-path", str(data), "--length-path", str(lengths), "--output-path", str(instruct)])
    adapter = tmp_path / "adapter"
    argv = [*four_step_argv(tiny_model_dir, instruct, adapter, "5"), "--overwrite", "True"]
    train_lora.main(four_step_argv(tiny_model_dir, instruct, adapter, "3"))  # the adapter the next command replaces
    old = lora_weights(adapter)

    def swap_then_die(staging, folder):
        assert utils.exchange_paths(staging, folder)
        raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(utils, "replace_folder", swap_then_die)
        with pytest.raises(Killed):
            train_lora.main(argv)
    new = lora_weights(adapter)
    assert (tmp_path / "adapter.replacing" / "checkpoint-4").is_dir()  # the old run's, now beside the new adapter
    _, steps_run = train_counting_steps(monkeypatch, argv)
    assert steps_run == [1, 2, 3, 4] and not (tmp_path / "adapter.replacing").exists()
    got = lora_weights(adapter)
    assert all(torch.equal(got[name], new[name]) for name in got)  # seed 5 again, from step 0: the same weights
    assert any(not torch.equal(got[name], old[name]) for name in got)


def test_an_interrupted_replacement_is_settled_by_its_run_ids(tmp_path):
    """Which finished adapter `.replacing` holds is told by the run ids: the replacement, not yet swapped in (the swap
    is done now), or the replaced one (deleted); a pair that names neither is refused."""
    folder, replacing = tmp_path / "adapter", tmp_path / "adapter.replacing"

    def finished(path, **marker):
        path.mkdir(exist_ok=True)
        (path / train_lora.ARGUMENTS_FILE).write_text(json.dumps(marker))

    finished(folder, run_id="a")
    finished(replacing, run_id="b", replaces="a")
    assert train_lora.settle_interrupted_replacement(str(folder))
    assert json.loads((folder / train_lora.ARGUMENTS_FILE).read_text()) == {"run_id": "b", "replaces": "a"}
    assert not replacing.exists()
    finished(replacing, run_id="a")
    assert not train_lora.settle_interrupted_replacement(str(folder)) and not replacing.exists()
    finished(replacing, run_id="c")
    with pytest.raises(UserError, match="neither the one .* replaced nor its replacement"):
        train_lora.settle_interrupted_replacement(str(folder))


def test_train_sh_cpu_preset_trains_in_two_processes(tiny_model_dir, small_data, tmp_path):
    """`PROCESSES=2 bash train.sh cpu` runs data-parallel on gloo and saves one adapter (later flags override
    the preset's model, data and length of training)."""
    import json
    import os
    import subprocess
    from pathlib import Path

    data, lengths = small_data
    instruct = tmp_path / "instruct.json"
    construct.main(["--data-path", str(data), "--length-path", str(lengths), "--output-path", str(instruct)])
    output_dir = tmp_path / "adapter"
    overrides = ["--model_name_or_path", str(tiny_model_dir), "--data_path", str(instruct)]
    overrides += ["--output_dir", str(output_dir), "--max_steps", "2", "--per_device_train_batch_size", "2"]
    done = subprocess.run(
        ["bash", "train.sh", "cpu", *overrides],
        cwd=Path(__file__).resolve().parents[1],
        env=os.environ | {"PROCESSES": "2"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    saved = json.loads((output_dir / "length_perception_args.json").read_text())
    assert saved["processes"] == 2
    assert (output_dir / "adapter_model.safetensors").is_file()


def test_train_smoke_trains_saves_and_predicts_with_the_adapter(tiny_model_dir, small_data, tmp_path):
    """benchmarks.train_smoke, the GPU script's training part, on the CPU preset and random weights as on the GPU:
    train.sh runs two steps, saves the adapter, and src.eval loads it again for seqsch's predictions."""
    import json

    from benchmarks import train_smoke

    data, lengths = small_data
    instruct = tmp_path / "instruct.json"
    construct.main(["--data-path", str(data), "--length-path", str(lengths), "--output-path", str(instruct)])
    out = tmp_path / "smoke"
    argv = ["--preset", "cpu", "--model", str(tiny_model_dir), "--load-format", "dummy", "--data-path", str(instruct)]
    argv += ["--eval-data-path", str(data), "--num-data", "6", "--steps", "2", "--eval-rows", "4", "--max-length", "8"]
    assert train_smoke.main([*argv, "--output-dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [(step["step"], step["exit_code"]) for step in summary["steps"]] == [("train", 0), ("eval", 0)]
    assert "adapter_model.safetensors" in summary["adapter_files"] and summary["eval"]["num_samples"] == 4
