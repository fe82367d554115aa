"""A record's own stop strings, top_p and seed in `python -m src.infer`: what each one changes in the answer line,
under static batches and under the slots engine's queue alike."""

from __future__ import annotations

import json

from src import infer

from .conftest import cli_args
from .test_infer import QUESTIONS, answers_by_id


def infer_rows(model_dir, records: list[dict], output, **flags) -> dict[str, dict]:
    requests = output.with_suffix(".in.jsonl")
    requests.write_text("".join(json.dumps(record) + "\n" for record in records))
    infer.main(cli_args(input=requests, output=output, model=model_dir, max_length=24, batch_size=3, **flags))
    return answers_by_id(output)


def test_a_stop_string_ends_the_answer_before_it_under_every_engine(tiny_model_dir, tmp_path):
    """The tiny model never ends by itself, so every answer runs to its 24-token cap. Given a stop string taken from
    the middle of its own greedy answer, the answer is that text up to where the string first begins, finished with
    reason "stop", after fewer tokens than 24: the same line from static batches (which run the row on, then count
    it as ended there: no retry once stopped) and from the slots engine's queue (which ends the row at that token)."""
    plain = [{"id": f"q{index}", "prompt": text} for index, text in enumerate(QUESTIONS[:6])]
    greedy = infer_rows(tiny_model_dir, plain, tmp_path / "plain.jsonl", strategy="vanilla")
    assert {row["generated_tokens"] for row in greedy.values()} == {24}
    stops = {key: row["text"][len(row["text"]) // 2 :][:3] for key, row in greedy.items()}
    expected = {key: greedy[key]["text"][: greedy[key]["text"].find(stop)] for key, stop in stops.items()}
    stopped = [record | {"stop": [stops[record["id"]]]} for record in plain]
    runs = {
        strategy: infer_rows(tiny_model_dir, stopped, tmp_path / f"{strategy}.jsonl", strategy=strategy, **flags)
        for strategy, flags in (("vanilla", {}), ("constant+fcr+resume", {"constant_length": 8}), ("continuous", {}))
    }
    for strategy, rows in runs.items():
        assert {key: row["text"] for key, row in rows.items()} == expected, strategy
        assert {row["finish_reason"] for row in rows.values()} == {"stop"}, strategy
        assert all(row["generated_tokens"] < 24 for row in rows.values()), strategy
    for row in runs["constant+fcr+resume"].values():  # cut at 8 tokens; one stopped within them is not retried
        assert row["attempts"] == (1 if row["generated_tokens"] <= 8 else 2)
    counts = {strategy: {key: row["generated_tokens"] for key, row in rows.items()} for strategy, rows in runs.items()}
    assert counts["vanilla"] == counts["continuous"] == counts["constant+fcr+resume"]


def test_a_records_own_top_p_and_seed_are_honoured(tiny_model_dir, tmp_path):
    """At temperature 1 the tiny model's answers are draws; a top_p so small that only the likeliest token is in the
    nucleus makes them the greedy answers, so a record's own top_p is seen to be applied, in static batches and in
    the queue. A group's draws start from its seed: the run's --seed (the same one, the same draws; another one,
    others), or a record's own, whatever --seed says."""
    plain = [{"id": f"q{index}", "prompt": text} for index, text in enumerate(QUESTIONS[:4])]
    greedy = infer_rows(tiny_model_dir, plain, tmp_path / "greedy.jsonl", strategy="vanilla")
    nucleus = [record | {"temperature": 1.0, "top_p": 1e-6} for record in plain]
    for strategy in ("vanilla", "continuous"):
        rows = infer_rows(tiny_model_dir, nucleus, tmp_path / f"nucleus-{strategy}.jsonl", strategy=strategy)
        assert {key: row["text"] for key, row in rows.items()} == {key: row["text"] for key, row in greedy.items()}
    sampled = [record | {"temperature": 1.0} for record in plain]
    seeded = [record | {"seed": 5} for record in sampled]
    runs = {"seeded, --seed 1": (seeded, 1), "seeded, --seed 2": (seeded, 2), "--seed 1": (sampled, 1)}
    runs |= {"--seed 1 again": (sampled, 1), "--seed 2": (sampled, 2)}
    text_of = {}
    for number, (run, (records, seed)) in enumerate(runs.items()):
        rows = infer_rows(tiny_model_dir, records, tmp_path / f"sampled-{number}.jsonl", strategy="vanilla", seed=seed)
        text_of[run] = {key: row["text"] for key, row in rows.items()}
    assert text_of["seeded, --seed 1"] == text_of["seeded, --seed 2"]  # the records' own seed, whatever --seed says
    assert text_of["--seed 1"] == text_of["--seed 1 again"]  # not the draws that ran before in this process
    assert text_of["--seed 1"] != text_of["--seed 2"]  # --seed decides the draws of records without one
