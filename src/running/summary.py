"""src.infer's summary: every process's totals as one result (the processes ran side by side, so the run took as
long as the slowest one), and the lines it prints."""

from __future__ import annotations

import sys

from ..scheduling.metrics import token_ratios
from .answering import Totals


def summary(totals: list[Totals], args, label: str, skipped: int, device: str, settings: dict) -> dict:
    """The run's summary from every process's totals: the processes ran side by side, so the run took as long as
    the slowest one. `label`: the strategy asked for ("plan" for the default plan), named where no group ran."""
    plans: dict[str, int] = {}
    for total in totals:
        for label, groups in total.plans.items():
            plans[label] = plans.get(label, 0) + groups
    requests = sum(total.requests for total in totals)
    generated = sum(total.generated_tokens for total in totals)
    slots = sum(total.token_slots for total in totals)
    data_order = sum(total.data_order_token_slots for total in totals)
    slowest = max(totals, key=lambda total: total.prediction_s + total.generation_s)
    latency = sum(total.latency_sum_s for total in totals)
    wall = slowest.prediction_s + slowest.generation_s
    ratios = token_ratios(
        requests, slots, generated, sum(t.recomputed for t in totals), sum(t.truncated for t in totals)
    )
    return {
        "input": args.input,
        "output": args.output,
        "strategy": plan_label(plans) if plans else label,
        "groups_by_strategy": plans,
        # the default plan asks the predictor for every group, a vanilla one too
        "predictor_path": args.predictor_path if label == "plan" or "proxy" in label else None,
        "device": device,
        "processes": len(totals),
        "requests": requests,
        "errors": sum(total.errors for total in totals),
        "answered_before": skipped,
        "wall_time_s": wall,  # prediction and generation; model loading and engine warm-up left out
        "prediction_time_s": slowest.prediction_s,
        "generation_time_s": slowest.generation_s,
        "engine_warmup_s": max(total.engine_warmup_s for total in totals),
        "requests_per_s": requests / wall if wall else 0.0,
        "mean_latency_s": latency / requests if requests else 0.0,  # from the start to each answer's line
        "generated_tokens": generated,
        "generated_tokens_per_s": generated / wall if wall else 0.0,
        "token_slots": slots,
        "effective_token_ratio": ratios["effective_token_ratio"],
        "truncated_ratio": ratios["truncated_ratio"],
        "failure_ratio": ratios["failure_ratio"],
        "data_order_token_slots": data_order,
        "data_order_effective_token_ratio": generated / data_order if data_order else 0.0,
        "token_slots_saved": 1 - slots / data_order if data_order else 0.0,
        "oom_splits": sum(total.oom_splits for total in totals),
        "settings": settings,
    } | estimate_summary(totals, slowest.generation_s)


def plan_label(plans: dict[str, int]) -> str:
    """The strategy that answered every group, or each with its groups where the plan changed between groups."""
    if len(plans) == 1:
        return next(iter(plans))
    return ", ".join(f"{label} ({groups} group{'s' * (groups != 1)})" for label, groups in plans.items())


def print_summary(result: dict) -> None:
    lines = [
        f"answered {result['requests']} requests (errors {result['errors']}, answered before "
        f"{result['answered_before']}) with {result['strategy']} on {result['device']} in "
        f"{result['wall_time_s']:.1f} s: {result['requests_per_s']:.3f} requests/s, "
        f"{result['generated_tokens_per_s']:.1f} generated tokens/s, mean latency {result['mean_latency_s']:.1f} s",
        f"token slots {result['token_slots']} ({result['effective_token_ratio'] * 100:.1f} % effective); in file "
        f"order they would have been {result['data_order_token_slots']} "
        f"({result['data_order_effective_token_ratio'] * 100:.1f} % effective): scheduling saved "
        f"{result['token_slots_saved'] * 100:.1f} % of the token slots",
    ]
    if "estimated_generation_s" in result:
        lines.append(
            f"cost model ({result['device_profile']}): generation estimated {result['estimated_generation_s']:.1f} s "
            f"against {result['generation_time_s']:.1f} s measured; in file order estimated "
            f"{result['data_order_estimated_s']:.1f} s ({result['estimated_speedup']:.2f}x this plan's estimate)"
        )
    if result["engine_warmup_s"]:
        lines.append(f"engine warm-up {result['engine_warmup_s']:.1f} s (compiling new shapes; not in the time above)")
    print("\n".join(lines), file=sys.stderr)


def estimate_summary(totals: list[Totals], generation: float) -> dict:
    """With --device-profile or the default plan: the cost model's seconds of generation for the plan that ran (the
    slowest process's) and for plain batches in file order over the same answers, against the measured seconds."""
    profile = totals[0].device_profile
    if profile is None:
        return {}
    estimated = max(total.estimated_s for total in totals)
    data_order = max(total.data_order_estimated_s for total in totals)
    return {
        "device_profile": profile,
        "estimated_generation_s": estimated,
        "data_order_estimated_s": data_order,
        "estimated_speedup": data_order / estimated if estimated else 0.0,
        "measured_over_estimated": generation / estimated if estimated else 0.0,
    }
