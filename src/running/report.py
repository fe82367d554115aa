"""What a strategy's result looks like on the terminal: one block per strategy, and one table row per strategy when a
command ran several."""

from __future__ import annotations


def print_result(result: dict) -> None:
    print(f"Strategy: {result['strategy']}, VBS: {result['vbs']}, FCR: {result['fcr']}")
    print(
        f"Total samples: {result['num_samples']}, Group size: {result['group_size']}, "
        f"Batch size: {result['batch_size']}, Max length: {result['max_length']}"
    )
    if result["processes"] > 1:
        line = "Processes: " + str(result["processes"])
        line += ", decode steps " + " / ".join(str(steps) for steps in result["process_decode_steps"])
        if not result["dry_run"]:
            line += ", wall " + " / ".join(f"{seconds:.2f}" for seconds in result["process_wall_times_s"]) + " s"
        print(line)
    if not result["dry_run"]:
        print(
            f"Time: {result['wall_time_s']:.2f} s (prediction {result['prediction_time_s']:.2f} s, "
            f"generation {result['generation_time_s']:.2f} s)"
        )
        print(f"Throughput: {result['throughput_samples_per_s']:.3f} samples/s")
        if "estimated_seconds" in result:
            print(f"Estimated: {estimate_line(result)}")
        if result.get("engine_warmup_s"):
            print(f"Engine warm-up: {result['engine_warmup_s']:.2f} s (compiling new shapes; not in the time above)")
    if result["dry_run"] and "estimated_seconds" in result:
        print(f"Estimated: {estimate_line(result)}")
    print(f"Average length: {result['average_length']:.2f} tokens")
    print(f"Effective token ratio: {result['effective_token_ratio'] * 100:.2f} %")
    print(f"Failure ratio: {result['failure_ratio'] * 100:.2f} %")
    if result.get("resume"):
        levels = " ".join(str(level) for level in result["fcr_retry_quantiles"]) or "none"
        reused = sum(batch.get("kv_reused_tokens", 0) for batch in result["batches"])
        print(
            f"Resumed: {result['resumed_tokens']} tokens carried over, {reused} prompt tokens served from kept KV "
            f"caches (retries capped at quantiles {levels}, then at the max length)"
        )
    latency = (
        f"Latency: mean {result['mean_latency_steps']:.0f} steps, p90 {result['p90_latency_steps']:.0f} steps, "
        f"max {result['max_latency_steps']:.0f} steps"
    )
    if not result["dry_run"]:
        latency += f" (mean {result['mean_latency_s']:.2f} s, p90 {result['p90_latency_s']:.2f} s)"
    print(latency)
    if result["unparsable_predictions"]:
        print(f"Unparsable predictions: {result['unparsable_predictions']} (given the max length)")
    rate = "" if result["dry_run"] else f" ({result['generated_tokens_per_s']:.1f} tokens/s)"
    print(f"Generated tokens: {result['generated_tokens']}{rate}")
    print()


def estimate_line(result: dict) -> str:
    """The cost model's seconds of generation, and against the measured ones in a real run."""
    estimated = result["estimated_seconds"]
    line = f"{estimated:.2f} s of generation, {result['num_samples'] / estimated:.3f} samples/s"
    if not result["dry_run"]:
        line += f" (measured {result['generation_time_s']:.2f} s: {result['generation_time_s'] / estimated:.2f}x)"
    return line + f", device profile {result['device_profile']}"


def print_table(results: list[dict]) -> None:
    """One line per strategy. Latency is in decode steps in a dry run, in seconds otherwise."""
    baseline = next((result for result in results if result["strategy"] == "vanilla"), None)
    unit = "steps" if results[0]["dry_run"] else "s"
    header = (
        f"{'strategy':<20}{'samples/s':>11}{'avg length':>12}{'effective':>11}{'failure':>9}"
        f"{'latency ' + unit:>15}{'p90 ' + unit:>11}{'speed-up':>10}"
    )
    print(header)
    print("-" * len(header))
    for result in results:
        speedup = (
            f"{result['throughput_samples_per_s'] / baseline['throughput_samples_per_s']:.2f}x" if baseline else "n/a"
        )
        throughput = f"{result['throughput_samples_per_s']:.3f}"
        if result["dry_run"] and "estimated_seconds" in result:  # the device profile's seconds stand in for time
            throughput = f"~{result['num_samples'] / result['estimated_seconds']:.3f}"
            speedup = f"~{baseline['estimated_seconds'] / result['estimated_seconds']:.2f}x" if baseline else "n/a"
        elif result["dry_run"]:  # no generation was timed: only the token columns mean anything
            speedup = throughput = "-"
        print(
            f"{result['strategy']:<20}{throughput:>11}{result['average_length']:>12.2f}"
            f"{result['effective_token_ratio'] * 100:>10.2f}%{result['failure_ratio'] * 100:>8.2f}%"
            f"{result[f'mean_latency_{unit}']:>15.1f}{result[f'p90_latency_{unit}']:>11.1f}{speedup:>10}"
        )
