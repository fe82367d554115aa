"""src.infer's default plan: lengths drawn from predicted quantiles, each candidate priced by hand, the cheapest
chosen, and the device's measured costs kept in the cache for the next run."""

import json
import math

import pytest

from src.running.plan import QUEUE_CANDIDATES, STATIC_CANDIDATES, Planner
from src.running.settings import RunSettings, parse_strategies
from src.scheduling.cost_model import DeviceCosts
from src.scheduling.plan_choice import draw_lengths, quantile_length
from src.scheduling.vbs_choice import StepCosts


def test_a_quantile_between_the_predicted_ones_is_log_linear_and_below_the_median_mirrored():
    levels, row = (0.5, 0.9), (100, 200)
    assert quantile_length(levels, row, 0.5) == pytest.approx(100)
    assert quantile_length(levels, row, 0.9) == pytest.approx(200)
    assert quantile_length(levels, row, 0.7) == pytest.approx(100 * math.sqrt(2))  # half way in log
    assert quantile_length(levels, row, 0.95) == pytest.approx(100 * 2**1.125)  # the last slope, 1/8 further
    assert quantile_length(levels, row, 0.1) == pytest.approx(50)  # as far below 100 as 0.9 is above it


def test_draws_stay_within_the_cap_and_repeat_with_the_seed():
    rows = {"a": [10, 400, 800], "b": [3, 3, 3]}
    first, again = draw_lengths(rows, (0.5, 0.8, 0.95), cap=256), draw_lengths(rows, (0.5, 0.8, 0.95), cap=256)
    assert first == again
    assert all(1 <= lengths["a"] <= 256 for lengths in first)
    assert all(lengths["b"] == 3 for lengths in first)  # every level says 3: every draw is 3


class KnownLengths:
    """A proxy-like predictor whose every quantile is the answer's true length: each draw is exact."""

    name = "proxy"
    quantile_levels = (0.5, 0.8, 0.95)

    def __init__(self, lengths):
        self.lengths, self.quantile_rows = lengths, {}

    def require_quantile(self, level):
        assert level in self.quantile_levels

    def predict(self, samples):
        self.quantile_rows = {sample.id: [self.lengths[sample.id]] * 3 for sample in samples}
        return {sample.id: self.lengths[sample.id] for sample in samples}


def choose(candidates, lengths):
    from src.common.data import Sample

    predictor = KnownLengths(lengths)
    settings = RunSettings(strategies=parse_strategies(list(candidates)), batch_size=16)
    settings = settings.with_predictors({"proxy": predictor})
    flat = DeviceCosts(StepCosts({1: 1.0, 16: 1.0}, 0.0), 0.0)  # every decode step 1 s, whatever its rows; free prefill
    samples = [Sample(sample_id, "", None) for sample_id in lengths]
    return Planner(settings, flat).choose(predictor, samples, 128, dict.fromkeys(lengths, 10))


def test_the_cheapest_plan_is_chosen_from_prices_worked_out_by_hand():
    # file order 10, 50, 100, 10, 50, 100, ...: 8 answers of each length
    lengths = {f"r{index}": (10, 50, 100)[index % 3] for index in range(24)}
    choice = choose(QUEUE_CANDIDATES, lengths)
    # vanilla: two batches in file order, each holding a 100: 99 + 99 decode steps (the prefill makes token 1)
    # proxy+fcr+resume: sorted, the 16 shortest cut at 50 (49 steps), then the 8 of 100 (99 steps)
    # continuous:proxy, 16 rows: the 10s and 50s at once; the 100s take the 10s' rows after iteration 10 and end at
    # 110; some row decodes in every iteration from 2 to 110: 109 steps
    assert choice.prices == {"continuous:proxy": 109.0, "proxy+fcr+resume": 148.0, "vanilla": 198.0}
    assert choice.strategy.label == "continuous:proxy"
    assert choice.predicted.lengths == lengths
    static = choose(STATIC_CANDIDATES, lengths)  # an engine that does not refill rows: no queue is priced
    assert static.prices == {"proxy+fcr+resume": 148.0, "proxy+fcr": 148.0, "vanilla": 198.0}
    assert static.strategy.label == "proxy+fcr+resume"


def test_the_measured_costs_are_kept_and_read_back_for_the_same_model(tiny_model, tmp_path, monkeypatch, capsys):
    from src.engines.registry import build_engine
    from src.running.cost_estimate import cached_costs, cost_cache_path

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    engine = build_engine("slots", *tiny_model)
    first = cached_costs(engine, 2, 16, 16)
    assert "measuring this device's costs" in capsys.readouterr().err
    assert cost_cache_path() == tmp_path / "length-scheduling" / "device-costs.json"
    (entry,) = json.loads(cost_cache_path().read_text()).values()
    assert entry["key"]["engine"] == "slots" and entry["key"]["dtype"] == "float32"
    assert cached_costs(engine, 2, 16, 16) == first  # read back, not measured again
    assert "measuring" not in capsys.readouterr().err
    cached_costs(engine, 1, 16, 16)  # another measurement's sizes: measured, kept beside the first
    assert len(json.loads(cost_cache_path().read_text())) == 2
    cost_cache_path().write_text("{not json")  # a broken cache is measured again and rewritten
    cached_costs(engine, 2, 16, 16)
    assert "measuring" in capsys.readouterr().err
    entries = json.loads(cost_cache_path().read_text())
    assert len(entries) == 1
    for wrong in ([0.1], {}, {"1": -1.0}):  # JSON of the wrong shape, no step cost, a negative one: measured again
        (entry,) = entries.values()
        entry["costs"]["base_seconds_per_step"] = wrong
        cost_cache_path().write_text(json.dumps(entries))
        assert cached_costs(engine, 2, 16, 16).steps.base.keys() == {1, 2}
        assert "measuring" in capsys.readouterr().err


def test_without_a_predictor_the_default_says_why_it_runs_in_file_order(eos_model_dir, tmp_path, monkeypatch, capsys):
    from src import infer
    from src.running import plan

    monkeypatch.setattr(plan, "proxy_available", lambda path: (False, "its encoder is missing: pip install x"))
    (tmp_path / "in.jsonl").write_text('{"id": "a", "prompt": "Hi."}\n')
    argv = ["--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"), "--max-length", "4"]
    summary = infer.main([*argv, "--model", str(eos_model_dir)])
    assert "plan: continuous, because requests run in file order (its encoder is missing: pip install x)" in (
        capsys.readouterr().err
    )
    assert summary["strategy"] == "continuous" and summary["predictor_path"] is None
    assert "estimated_generation_s" not in summary  # nothing was priced, so nothing was measured
