"""The compiled engine (a static KV cache and torch.compile) generates what the eager engine generates, with a
bounded set of shapes and its compilation kept out of the throughput; `--engine auto`; `--slots auto`; and the GPU
table's script end to end on a CPU with the tiny model."""

from __future__ import annotations

import json
import sys

import pytest

from benchmarks import gpu_table
from src import benchmark
from src.common.models import load_model
from src.engines.eager import TransformersEngine
from src.engines.registry import build_engine, resolve_engine_name
from src.engines.static_cache import CACHE_LENGTH_STEP, cache_length, padded_rows

from .conftest import PROJECT, cli_args

TOKEN_COLUMNS = ("token_slots", "generated_tokens", "average_length", "effective_token_ratio", "num_batches")


@pytest.fixture(scope="module")
def engines(eos_model_dir):
    """Both engines on one model whose greedy answers end at lengths that vary from prompt to prompt."""
    model, tokenizer, _ = load_model(str(eos_model_dir), "cpu", "float32")
    return TransformersEngine(model, tokenizer), build_engine("compiled", model, tokenizer)


def test_shapes_are_rounded_to_few_sizes():
    assert [padded_rows(rows) for rows in (1, 2, 3, 5, 16, 17, 99, 256)] == [2, 2, 4, 8, 16, 32, 128, 256]
    assert [cache_length(tokens) for tokens in (1, 128, 129, 612)] == [128, 128, 256, 640]


def test_compiled_generation_equals_eager_greedy_and_replayed(engines):
    eager, compiled = engines
    prompts = [[1, 5, 6, 7, 8], [1, 9, 10], [1, 11, 12, 13, 14, 15, 16], [1, 300, 400, 500], [1, 42]]
    for rows in (3, 5, 1):  # with filler rows: 4, 8 and 2
        for replay in (None, [3, 7, 5, 2, 6][:rows]):
            expected = eager.generate(prompts[:rows], 12, 0.0, replay)
            got = compiled.generate(prompts[:rows], 12, 0.0, replay)
            assert [sample.token_ids for sample in got] == [sample.token_ids for sample in expected]
            assert [(sample.length, sample.finished, sample.text) for sample in got] == [
                (sample.length, sample.finished, sample.text) for sample in expected
            ]
            if replay is None and rows > 1:  # free answers of this model end at different lengths, some never
                assert len({sample.length for sample in got}) > 1
            # the batch ran as long as its longest real row: filler rows ended at their first token
            assert compiled.last_timing.decode_steps == max(sample.length for sample in got) - 1
    # each new shape paid one timed warm-up; (rows, cache length) pairs: 4, 8 and 2 rows at one length
    assert compiled.warmed_shapes == [(4, 128), (8, 128), (2, 128)]
    paid = compiled.warmup_seconds
    compiled.generate(prompts[:4], 12)  # 4 rows at a 128-token cache: a shape already warm pays nothing more
    assert compiled.warmup_seconds == paid > 0 and len(compiled.warmed_shapes) == 3


def test_a_cache_is_dropped_when_the_budget_is_spent(engines):
    eager, _ = engines
    compiled = build_engine("compiled", eager.model, eager.tokenizer)
    compiled.cache_budget_bytes = 4 * 128 * compiled.bytes_per_token  # room for one cache of 4 rows
    compiled.generate([[1, 5], [1, 6], [1, 7]], 4)
    compiled.generate([[1, 5]], 4)
    assert list(compiled.caches) == [(2, 128)]  # the 4-row cache made room
    again = compiled.generate([[1, 5], [1, 6], [1, 7]], 4, 0.0, [4, 2, 3])
    assert [sample.length for sample in again] == [4, 2, 3]
    assert list(compiled.caches) == [(4, 128)] and compiled.warmed_shapes == [(4, 128), (2, 128), (4, 128)]


def test_engine_auto_is_compiled_on_cuda_only(tiny_model):
    assert resolve_engine_name("auto", "cuda") == "compiled"
    assert resolve_engine_name("auto", "cuda:1") == "compiled"
    assert resolve_engine_name("auto", "cpu") == "slots"
    assert resolve_engine_name("compiled", "cpu") == "compiled"
    model, tokenizer = tiny_model
    assert build_engine("auto", model, tokenizer).name == "slots"


@pytest.mark.parametrize("engine_name", ["compiled", "graph", "captured"])
def test_benchmark_on_a_compiled_engine_gives_the_eager_token_columns(tiny_model_dir, small_data, engine_name):
    data, lengths = small_data
    flags = cli_args(
        model=tiny_model_dir, device="cpu", data_path=data, replay_lengths=lengths, max_length=8, batch_size=2
    )
    strategies = ["--strategies", "vanilla", "gt+vbs+fcr", "--group-size", "4"]
    eager = benchmark.main([*flags, *strategies, "--engine", "transformers"])
    compiled = benchmark.main([*flags, *strategies, "--engine", engine_name])
    assert compiled["args"]["engine_resolved"] == engine_name and eager["args"]["engine_resolved"] == "transformers"
    for expected, got in zip(eager["results"], compiled["results"], strict=True):
        assert {key: got[key] for key in TOKEN_COLUMNS} == {key: expected[key] for key in TOKEN_COLUMNS}
        assert {row["id"]: row["length"] for row in got["samples"]} == {
            row["id"]: row["length"] for row in expected["samples"]
        }
        assert expected["engine_warmup_s"] == 0  # the eager engine compiles nothing
        # a batch's timed steps follow its generated length (the first token comes with the prefill)
        assert [batch["decode_steps_timed"] for batch in got["batches"]] == [
            batch["steps"] - 1 for batch in got["batches"]
        ]
    # vanilla by hand, batches of 2 capped at 8: (a3 b10) 8 x 2 + (c1 d6) 6 x 2 + (e2 f8) 8 x 2
    assert compiled["results"][0]["token_slots"] == 16 + 12 + 16


def test_slots_auto_gives_continuous_batching_the_largest_static_batch_memory(small_data):
    data, lengths = small_data
    flags = cli_args(dry_run=True, data_path=data, replay_lengths=lengths, max_length=8, batch_size=2)
    strategies = ["--strategies", "continuous", "vanilla", "gt+vbs", "continuous"]
    output = benchmark.main([*flags, "--slots", "auto", *strategies])
    first, vanilla, sorted_vbs, last = output["results"]
    # before any static strategy: --batch-size; the dry run counts generated tokens only (no prompts)
    assert first["slots"] == 2
    assert max(batch["cache_tokens"] for batch in vanilla["batches"]) == 2 * 8
    # the paper's VBS puts all six (bucket 50: 256 rows) in one batch of cap 8: 6 x 8 tokens = 6 slots of 8
    assert max(batch["cache_tokens"] for batch in sorted_vbs["batches"]) == 6 * 8
    assert last["slots"] == 6


def test_gpu_table_script_runs_end_to_end_on_a_cpu(tiny_model_dir, small_data, tmp_path):
    """Static parts, continuous batching and the step part: the captured engine runs the whole table, the eager one
    the comparison on the same samples, continuous batching gets the largest static batch's memory, and the step part
    times both engines of its own. (The graph part is the eager part's command on the graph engine, whose rows
    test_benchmark_on_a_compiled_engine_gives_the_eager_token_columns checks: here it would add 30 s on a CPU.)"""
    data, lengths = small_data
    out = tmp_path / "table"
    flags = ["--output-dir", str(out)]
    flags += ["--model", str(tiny_model_dir), "--load-format", "auto", "--device", "cpu", "--data-path", str(data)]
    flags += ["--replay-lengths", str(lengths), "--num-data", "6", "--batch-size", "2", "--max-length", "8"]
    flags += ["--predictor-path", str(tmp_path / "no-proxy"), "--predictions-path", "", "--budget-s", "600"]
    flags += ["--parts", "captured", "eager", "continuous", "step"]
    assert gpu_table.main(flags) == 0  # the script in this process; each part is a process of its own
    for name in ("captured.json", "eager.json", "continuous.json", "step.json", "summary.json"):
        assert (out / name).is_file(), name
    rows = json.loads((out / "summary.json").read_text())["rows"]
    by_engine = {(row["engine"], row["strategy"]): row for row in rows}
    assert set(by_engine) == {
        ("captured", "vanilla"),
        ("captured", "gt+vbs+fcr"),
        ("captured", "gt"),
        ("transformers", "vanilla"),
        ("transformers", "gt+vbs+fcr"),
        ("transformers", "continuous"),
        ("transformers", "continuous:gt"),
    }
    for strategy in ("vanilla", "gt+vbs+fcr"):  # the same samples and the same token columns on every engine
        assert len({by_engine[(engine, strategy)]["average_length"] for engine in ("captured", "transformers")}) == 1
    assert by_engine[("captured", "vanilla")]["x_vanilla_same_engine"] == 1.0
    captured = json.loads((out / "captured.json").read_text())
    largest = max(batch["cache_tokens"] for result in captured["results"] for batch in result["batches"])
    slots = largest // (captured["args"]["longest_prompt_tokens"] + 8)
    continuous = by_engine[("transformers", "continuous")]
    assert continuous["slots"] == slots and continuous["continuous_settings"]["speed"] == "graphs"
    assert continuous["ms_per_decode_step"] > 0  # per iteration of the iteration model
    assert "no proxy predictor" in (out / "log.txt").read_text()
    summary = json.loads((out / "summary.json").read_text())
    # each part's first warm-up, before any strategy (compilation, or filler batches on new shapes): eager has none
    assert summary["compilation_s"]["eager"] == 0
    # the step part: 2 rows at the step's context on both engines, the graph one's warm-up its compilation
    assert set(summary["step"]) == {"captured", "graph"}
    assert all(result["clock_ms_per_step"] > 0 and result["timed_calls"] == 3 for result in summary["step"].values())
    assert summary["step"]["graph"]["warmup_s"] > summary["step"]["captured"]["warmup_s"]
    assert "2 rows, 640-token prompts, 64 tokens (graph)" in (out / "table.md").read_text()


def test_gpu_table_hands_the_whole_table_down_the_chain_when_an_engine_fails(small_data, tmp_path):
    """A captured part that returns nothing (here: no such model) hands the whole table to the graph part, unasked,
    and that one to the compiled part; each fails the same way here, and the log says each ran every strategy."""
    data, lengths = small_data
    out = tmp_path / "table"
    argv = ["--output-dir", str(out), "--model", "no-such-model"]
    argv += ["--load-format", "auto", "--device", "cpu", "--data-path", str(data), "--replay-lengths", str(lengths)]
    argv += ["--predictor-path", str(tmp_path / "no-proxy"), "--predictions-path", "", "--parts", "captured"]
    assert gpu_table.main(argv) == 1  # in this process; each part is a process of its own
    starts = [line for line in (out / "log.txt").read_text().splitlines() if line.startswith("== ") and ":" in line]
    whole_table = [line.split()[1] for line in starts if "--strategies vanilla gt+vbs+fcr gt" in line]
    assert whole_table == ["captured", "graph", "compiled"]


def test_gpu_table_script_skips_parts_past_its_budget(tmp_path):
    out = tmp_path / "table"
    out.mkdir()
    (out / "compiled.json").write_text(json.dumps({"results": [{"strategy": "stale"}]}))  # an earlier run's
    assert gpu_table.main(["--output-dir", str(out), "--budget-s", "0"]) == 1  # nothing ran
    assert (out / "log.txt").read_text().count("skipped, the budget is spent") == 4  # captured, continuous, train, step
    assert json.loads((out / "summary.json").read_text())["rows"] == [] and not (out / "compiled.json").exists()


def test_calibration_compiles_both_timed_shapes_before_timing(engines):
    eager, _ = engines
    compiled = build_engine("compiled", eager.model, eager.tokenizer)
    # context 120: the 1-token call needs a 128-token cache, the 9-token call a 256-token one
    assert compiled.decode_step_seconds(2, 120) > 0
    assert compiled.warmed_shapes == [(2, 128), (2, 256)]


@pytest.fixture(scope="module")
def free_running_engines(tiny_model):
    """Both engines on the tiny model, whose near-flat random logits rarely make EOS the top token or a sampled one:
    answers run to the cap, and sampling at temperature 1 almost never picks the greedy token."""
    model, tokenizer = tiny_model
    return TransformersEngine(model, tokenizer), build_engine("compiled", model, tokenizer)


def test_compiled_generation_past_one_cache_step_equals_eager(free_running_engines):
    """A batch whose prompt plus new tokens pass CACHE_LENGTH_STEP runs on a static cache long enough for both (the
    next step, 256), and generates what the eager engine generates, every row to the length it was asked for. A cache
    sized for the prompt alone would be too short to hold the answer."""
    eager, compiled = free_running_engines
    prompts = [[1, 5, 6, 7, 8], [1, 9, 10]]  # 2 rows: no filler row
    replay = [CACHE_LENGTH_STEP + 12, CACHE_LENGTH_STEP + 3]  # both answers longer than one cache step
    expected = eager.generate(prompts, max(replay), 0.0, replay)
    got = compiled.generate(prompts, max(replay), 0.0, replay)
    assert [sample.token_ids for sample in got] == [sample.token_ids for sample in expected]
    assert [(sample.length, sample.finished) for sample in got] == [(length, True) for length in replay]
    assert compiled.warmed_shapes[-1] == (2, 2 * CACHE_LENGTH_STEP)  # 5 prompt tokens + 140 new ones


def test_compiled_sampling_follows_the_temperature_and_the_seed(free_running_engines):
    """At temperature 1 the compiled engine samples: its answers differ from its greedy ones, and under the same seed
    they are the eager engine's answers, so a sampled run does not depend on the engine it ran on. An engine that
    dropped the temperature would give its greedy answers back."""
    from src.common.utils import set_seed

    eager, compiled = free_running_engines
    prompts = [[1, 5, 6, 7, 8], [1, 9, 10]]  # 2 rows: no filler row, so both engines draw for the same rows
    new_tokens = 8  # 16 draws over a near-flat distribution of 32000 tokens: each one is the greedy token rarely
    greedy = compiled.generate(prompts, new_tokens, 0.0)
    set_seed(0)
    expected = eager.generate(prompts, new_tokens, 1.0)
    set_seed(0)
    got = compiled.generate(prompts, new_tokens, 1.0)
    # position by position, over the shorter of the two answers (a sampled one may end at an EOS sooner)
    differing = sum(
        token != greedy_token
        for sample, greedy_sample in zip(got, greedy, strict=True)
        for token, greedy_token in zip(sample.token_ids, greedy_sample.token_ids, strict=False)
    )
    assert differing > new_tokens  # more than half of the 16 draws: none of them at all with the temperature dropped
    assert [sample.token_ids for sample in got] == [sample.token_ids for sample in expected]


def test_gpu_table_reads_the_strategies_a_stopped_part_finished(tmp_path):
    """A part stopped at the deadline has no --output-json yet: its finished strategies are in the partial file."""
    from benchmarks.gpu_table import read_results

    (tmp_path / "compiled.json.partial").write_text(json.dumps({"results": [{"strategy": "vanilla"}], "flags": {}}))
    assert read_results(tmp_path / "compiled.json")["results"] == [{"strategy": "vanilla"}]
    assert read_results(tmp_path / "eager.json") == {}


def test_one_compilation_serves_every_batch_size_and_cache_length(tiny_model):
    """Rows 2 to 16 and caches of 128 and 256 tokens run through the decode step compiled for the first batch: one
    graph in all (each new shape only pays its warm-up run), with the eager engine's tokens."""
    import torch
    from torch._dynamo.utils import counters

    model, tokenizer = tiny_model
    torch._dynamo.reset()  # forget what other tests compiled, so that this engine's first batch compiles afresh
    counters.clear()
    compiled, eager = build_engine("compiled", model, tokenizer), TransformersEngine(model, tokenizer)
    graphs = []
    for rows, new_tokens in ((1, 4), (3, 4), (8, 4), (16, 4), (2, 140)):
        prompts = [[tokenizer.bos_token_id, 100 + row, 200] for row in range(rows)]
        lengths = [new_tokens] * rows
        assert [sample.token_ids for sample in compiled.generate(prompts, new_tokens, 0.0, lengths)] == [
            sample.token_ids for sample in eager.generate(prompts, new_tokens, 0.0, lengths)
        ]
        graphs.append(counters["stats"]["unique_graphs"])
    assert compiled.warmed_shapes == [(2, 128), (4, 128), (8, 128), (16, 128), (2, 256)]
    assert graphs == [1, 1, 1, 1, 1]


def test_gpu_table_fallback_runs_only_what_the_parts_before_left_out(tmp_path, monkeypatch):
    """A part that stopped after vanilla leaves gt+vbs+fcr and gt to the next engine of the chain (captured, graph,
    compiled), which runs them with vanilla (the same-engine ratio needs it); a part that returned the whole table
    leaves nothing, and the later parts then run only when asked for, with the compared strategies."""
    from benchmarks import gpu_table

    def fake_part(returned):
        calls = []

        def run_part(out, name, flags, deadline):
            strategies = flags[flags.index("--strategies") + 1 :]
            calls.append((name, strategies))
            done = returned.get(name, strategies)
            (out / f"{name}.json").write_text(json.dumps({"results": [{"strategy": s} for s in done]}))
            if name in returned.get("stopped at the deadline", []):
                return None
            return 0 if done == strategies else 1

        return calls, run_part

    def run(parts, returned):
        out = tmp_path / f"run-{len(list(tmp_path.iterdir()))}"
        out.mkdir()
        calls, run_part = fake_part(returned)
        monkeypatch.setattr(gpu_table, "run_part", run_part)
        flags = ["--predictor-path", str(tmp_path / "no-proxy"), "--predictions-path", "", "--parts", *parts]
        args = gpu_table.parse_args(flags)
        gpu_table.run_static_parts(args, out, deadline=float("inf"))
        return calls

    whole = ["vanilla", "gt+vbs+fcr", "gt"]
    assert run(["graph"], {"graph": ["vanilla"]}) == [("graph", whole), ("compiled", whole)]
    assert run(["graph"], {}) == [("graph", whole)]
    assert run(["graph", "compiled", "eager"], {}) == [
        ("graph", whole),
        ("compiled", ["vanilla", "gt+vbs+fcr"]),
        ("eager", ["vanilla", "gt+vbs+fcr"]),
    ]
    # the default: the captured part runs the table; a failing one hands it to the graph part, then to the compiled one
    assert run(["captured"], {}) == [("captured", whole)]
    assert run(["captured"], {"captured": []}) == [("captured", whole), ("graph", whole)]
    # a part stopped at the deadline leaves no time for the next one in the chain, even after one that ended
    stopped = {"captured": [], "graph": ["vanilla"], "stopped at the deadline": ["graph"]}
    assert run(["captured"], stopped) == [("captured", whole), ("graph", whole)]
    assert run(["captured"], {"captured": ["vanilla", "gt"], "graph": ["vanilla"]}) == [
        ("captured", whole),
        ("graph", ["vanilla", "gt+vbs+fcr"]),
        ("compiled", ["vanilla", "gt+vbs+fcr"]),
    ]


def test_offline_wheels_installs_the_carried_wheels_before_the_command(tmp_path):
    """benchmarks/offline_wheels.sh run: the wheels in its folder installed into a site folder put first on the path,
    then the command; without a command or without wheels, one line and exit 2, before anything is installed."""
    import os
    import subprocess
    import zipfile

    wheels, site = tmp_path / "wheels", tmp_path / "site"
    wheels.mkdir()
    environment = os.environ | {"OFFLINE_WHEELS": str(wheels), "OFFLINE_SITE": str(site)}

    def offline(*arguments):
        command = ["bash", "benchmarks/offline_wheels.sh", *arguments]
        return subprocess.run(command, cwd=PROJECT, capture_output=True, text=True, env=environment, timeout=300)

    for arguments, message in (((), "usage:"), (("run",), "run needs a command"), (("run", "true"), "no wheels in")):
        done = offline(*arguments)
        assert done.returncode == 2 and message in done.stderr and len(done.stderr.splitlines()) == 1
    assert not site.exists()

    info = "offline_probe-1.0.dist-info"
    with zipfile.ZipFile(wheels / "offline_probe-1.0-py3-none-any.whl", "w") as wheel:  # the least a wheel holds
        wheel.writestr("offline_probe/__init__.py", "CARRIED = 'from the wheel'\n")
        wheel.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: offline_probe\nVersion: 1.0\n")
        wheel.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        wheel.writestr(f"{info}/RECORD", "")
    done = offline("run", sys.executable, "-c", "import offline_probe; print(offline_probe.CARRIED)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "from the wheel" and (site / "offline_probe").is_dir()
    assert done.stdout.startswith("torch ")  # the versions the command will run with
