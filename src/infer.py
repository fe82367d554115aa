"""Answer a file of prompts, faster than plain batching: predict how long each answer will be, batch requests of
similar predicted length together, generate, and write each answer as it finishes.

    python -m src.infer --input prompts.jsonl --output answers.jsonl --model smollm2-135m
    python -m src.infer --input batch.jsonl --output out.jsonl --model ./ckpts/vicuna-7b --strategy gt+vbs+fcr \\
        --length-path lengths.json

Input: JSON lines or one JSON list; each record a prompt, an Alpaca record, a FastChat conversation or an OpenAI
batch line (src/request_file.py says which fields). An OpenAI line's own max_tokens and temperature win over the flags
for that line. Output: one JSON line per request (src/answers.py), appended as requests finish and flushed to disk;
running the same command again skips the ids already answered (a line a kill cut short is dropped and redone) and
refuses settings that would answer differently. A request that cannot run (an empty prompt, a prompt that leaves no
room in the model's context) gets an error line and the others run.

The default strategy is proxy+fcr+resume with the predictor that ships in the clone (Vicuna-7B's lengths on
Alpaca prompts; `python -m src.fit_proxy` fits one to your model): requests are predicted, sorted and cut at their
predicted length, and the few that run past it continue from their own tokens. Under greedy decoding in float32 the
schedule changes the order in which requests run, not their answers (docs/INFER.md: in 16-bit types any batching,
plain batching's too, changes some). Requests are read, scheduled and written one group
(`--group-size`) at a time, so memory stays bounded on large files. Under torchrun or `accelerate launch` each
process answers every K-th group into a file of its own, and the main process appends those to the output at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .common.answers import AnswerWriter, answer_row, error_row, read_complete_lines
from .common.cli import (
    MAX_SEED,
    HelpFormatter,
    add_model_arguments,
    add_predictor_arguments,
    check_model_arguments,
    check_output_file,
    check_predictor_arguments,
    check_range,
    predictor_context,
    run_cli,
)
from .common.data import Sample, load_length_file, require_ids
from .common.distributed import start_processes
from .common.request_file import Request, check_request_file, read_requests
from .common.utils import Timer, UserError, write_json_atomic, write_text_atomic
from .predictors.proxy import SHIPPED_PROXY_PATH, proxy_available
from .predictors.registry import PREDICTORS, build_predictor
from .running.strategies import (
    StaticBatchExecutor,
    engine_warmup_seconds,
    parse_strategy,
    predict_for_schedule,
    schedule_config,
)
from .scheduling.metrics import data_order_token_slots, token_ratios
from .scheduling.schedule import PAPER_VBS_TABLE, parse_vbs_table, run_schedule

# The best schedule a predictor with quantiles allows (docs/RESUME.md); without one, none.
DEFAULT_STRATEGY = "proxy+fcr+resume"
FALLBACK_STRATEGY = "vanilla"
# Settings that change what a request's answer is: an output written under others is not continued.
ANSWER_SETTINGS = (
    "model",
    "load_format",
    "dtype",
    "engine",
    "conv_template",
    "lora_path",
    "max_length",
    "temperature",
    "top_p",
    "seed",
    "replay_lengths",
    "replay_field",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter, allow_abbrev=False)
    parser.add_argument("--input", required=True, help="requests: JSON lines or a JSON list")
    parser.add_argument("--output", required=True, help="answers: JSON lines, appended as requests finish")
    parser.add_argument("--summary-json", default=None, help="also write the summary here")
    add_model_arguments(parser)
    parser.add_argument(
        "--strategy",
        default=None,
        help=f"how requests are batched, as in src.benchmark (e.g. vanilla, gt+vbs+fcr); default {DEFAULT_STRATEGY} "
        f"when the proxy predictor loads, else {FALLBACK_STRATEGY}",
    )
    parser.add_argument("--max-length", type=int, default=512, help="most new tokens per answer (a record's own wins)")
    parser.add_argument("--batch-size", type=int, default=16, help="requests generated together (VBS: short ones more)")
    parser.add_argument("--group-size", type=int, default=256, help="requests read, predicted and scheduled together")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (a record's own wins)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling above temperature 0; 1 is off")
    parser.add_argument("--seed", type=int, default=42, help="seed of sampling")
    parser.add_argument(
        "--vbs-table",
        default=",".join(f"{bucket}:{size}" for bucket, size in PAPER_VBS_TABLE.items()),
        help="bucket:batch_size pairs of +vbs strategies (the paper's A100 table)",
    )
    parser.add_argument("--length-path", default=None, help="length file of strategy gt (the oracle)")
    parser.add_argument("--gt-field", default=None, help="the oracle's column; default L_max over the temperatures")
    parser.add_argument("--lora-path", default=None, help="LoRA length-perception adapter of strategy seqsch")
    parser.add_argument(
        "--replay-lengths",
        default=None,
        help="measuring: a length file; every request ends exactly at its recorded length (its text is the model's "
        "up to there)",
    )
    parser.add_argument("--replay-field", default="L_t0.0", help="the length file's column to replay")
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up call")
    add_predictor_arguments(parser)
    parser.set_defaults(predictor_path=str(SHIPPED_PROXY_PATH))
    args = parser.parse_args(argv)
    for flag, value in (("--max-length", args.max_length), ("--batch-size", args.batch_size)):
        check_range(flag, value, 1)
    check_range("--group-size", args.group_size, 1)
    check_range("--temperature", args.temperature, 0)
    check_range("--top-p", args.top_p, 0, 1, open_low=True)
    check_range("--seed", args.seed, 0, MAX_SEED)
    check_predictor_arguments(args)
    try:
        args.vbs_table_parsed = parse_vbs_table(args.vbs_table)
    except ValueError as error:
        raise UserError(f"--vbs-table: {error}") from None
    check_paths(args)
    args.strategy_parsed = choose_strategy(args)
    return args


def _same_file(first: str | Path, second: str | Path) -> bool:
    first, second = Path(first), Path(second)
    if first.exists() and second.exists():
        return os.path.samefile(first, second)
    return first.resolve() == second.resolve()


def check_paths(args) -> None:
    """Outputs can be written and none of them is an input."""
    check_output_file("--output", args.output)
    check_output_file("--summary-json", args.summary_json)
    inputs = {"--input": args.input, "--replay-lengths": args.replay_lengths, "--length-path": args.length_path}
    outputs = {"--output": args.output, "--summary-json": args.summary_json}
    for out_flag, out_path in outputs.items():
        for in_flag, in_path in inputs.items():
            if out_path and in_path and _same_file(out_path, in_path):
                raise UserError(f"{out_flag} {out_path} is the {in_flag} file; choose another {out_flag}")
    if args.summary_json and _same_file(args.summary_json, args.output):
        raise UserError("--summary-json and --output name the same file; choose another --summary-json")


def choose_strategy(args):
    """The --strategy, or the default: proxy+fcr+resume with a predictor that loads, else vanilla (said on stderr)."""
    text = args.strategy
    if text is None:
        ready, reason = proxy_available(args.predictor_path)
        text = DEFAULT_STRATEGY if ready else FALLBACK_STRATEGY
        if not ready:
            print(f"note: strategy {FALLBACK_STRATEGY}, because {reason}", file=sys.stderr)
    strategy = parse_strategy(text)
    if strategy.continuous:
        raise UserError(f"--strategy {text}: src.infer runs static batches; use src.benchmark for continuous batching")
    if strategy.predictor == "gt" and args.length_path is None:
        raise UserError("strategy gt needs --length-path: the length file of these requests")
    return strategy


# --------------------------------------------------------------------------- the output files


def rank_path(output: str, rank: int) -> Path:
    """Where process `rank` appends: the output itself for the main process, a file beside it for the others."""
    return Path(output) if rank == 0 else Path(f"{output}.rank{rank}.partial")


def rank_paths(output: str) -> list[Path]:
    """The output and every other process's file of an earlier or this run."""
    path = Path(output)
    return [path, *sorted(path.parent.glob(f"{path.name}.rank*.partial"))]


def settings_path(output: str) -> Path:
    return Path(f"{output}.settings.json")


def answer_settings(args) -> dict:
    return {key: getattr(args, key) for key in ANSWER_SETTINGS}


def check_settings(args, answered: int) -> None:
    """An output that holds answers continues only under the settings that made them."""
    path, settings = settings_path(args.output), answer_settings(args)
    if not answered:
        return
    try:
        earlier = json.loads(path.read_text()) if path.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        earlier = "unreadable"
    if earlier != settings:
        different = (
            [key for key in ANSWER_SETTINGS if earlier.get(key) != settings[key]]
            if isinstance(earlier, dict)
            else [f"{path} is missing or unreadable"]
        )
        raise UserError(
            f"{args.output} holds {answered} answers made with other settings ({', '.join(different)}): rerun with "
            "those settings, or choose another --output"
        )


def answered_ids(output: str, repair: bool) -> set[str]:
    """Ids with a complete line in the output or a process's file."""
    return {row["id"] for path in rank_paths(output) for row in read_complete_lines(path, repair)}


def merge_rank_files(output: str) -> None:
    """The main process appends the other processes' lines to the output, then removes their files."""
    others = rank_paths(output)[1:]
    if not others:
        return
    with AnswerWriter(Path(output)) as writer:
        present = {row["id"] for row in read_complete_lines(Path(output))}
        for path in others:
            for row in read_complete_lines(path):
                if row["id"] not in present:
                    writer.add(row)
                    present.add(row["id"])
    for path in others:
        path.unlink()


# --------------------------------------------------------------------------- the run


@dataclass
class Totals:
    """What this process answered, for the summary."""

    requests: int = 0
    errors: int = 0
    generated_tokens: int = 0
    token_slots: int = 0
    data_order_token_slots: int = 0  # what the same requests would have cost batched in file order
    truncated: int = 0
    recomputed: int = 0
    prediction_s: float = 0.0
    generation_s: float = 0.0
    engine_warmup_s: float = 0.0
    oom_splits: int = 0


def groups_of(requests, group_size: int, default_cap: int, default_temperature: float):
    """(cap, temperature, requests) groups in file order: requests with the same sampling settings, at most
    `group_size` of them; a setting's group is yielded when it is full, and the rest at the end."""
    buffers: dict[tuple[int, float], list[Request]] = {}
    for request in requests:
        key = (
            request.max_tokens if request.max_tokens is not None else default_cap,
            request.temperature if request.temperature is not None else default_temperature,
        )
        buffers.setdefault(key, []).append(request)
        if len(buffers[key]) == group_size:
            yield (*key, buffers.pop(key))
    for key, members in buffers.items():
        yield (*key, members)


@dataclass
class Runner:
    """One process's model, predictor and executor, answering one group at a time into `writer`."""

    args: argparse.Namespace
    strategy: object
    predictor: object
    formatter: object
    engine: object
    executor: StaticBatchExecutor
    writer: AnswerWriter
    context_length: int | None
    replay: dict[str, int] | None
    totals: Totals = field(default_factory=Totals)

    def answer_group(self, cap: int, temperature: float, requests: list[Request], progress) -> None:
        runnable, prompt_ids = [], {}
        for request in requests:
            ids = self.formatter.encode_conversation(request.messages)
            if self.context_length is not None and len(ids) + cap > self.context_length:
                self.refuse(
                    request.id,
                    f"a prompt of {len(ids)} tokens and {cap} new tokens exceed the model's context of "
                    f"{self.context_length} tokens",
                    progress,
                )
                continue
            runnable.append(request)
            prompt_ids[request.id] = ids
        if not runnable:
            return
        self.executor.prompt_ids = prompt_ids
        self.executor.temperature = temperature
        samples = [Sample(request.id, request.prompt, None) for request in runnable]
        device = self.engine.device
        with Timer(device) as prediction_timer:
            predicted = predict_for_schedule(self.strategy, self.predictor, samples, cap)
        config = schedule_config(self.strategy, self.args.batch_size, len(runnable), cap, self.args.vbs_table_parsed)
        started, generated_before, done_before = time.perf_counter(), self.totals.generated_tokens, 0

        def on_result(result, executed) -> None:  # a request's final answer: written with its batch
            self.writer.add(
                answer_row(
                    result.id,
                    result.text,
                    len(prompt_ids[result.id]),
                    result.length,
                    result.finished,
                    predicted.lengths[result.id],
                    executed.batch.attempt + 1,
                )
            )
            self.totals.generated_tokens += result.length

        def on_batch(_executed, done) -> None:
            nonlocal done_before
            self.writer.flush()
            progress.update(done - done_before)
            done_before = done
            rate = (self.totals.generated_tokens - generated_before) / max(1e-9, time.perf_counter() - started)
            progress.set_postfix_str(f"{rate:.0f} tokens/s", refresh=False)

        warmup_before = engine_warmup_seconds(self.engine)
        splits_before = self.executor.oom_splits
        with Timer(device) as generation_timer:
            record = run_schedule(
                [sample.id for sample in samples],
                predicted.lengths,
                config,
                self.executor,
                on_batch,
                caps=predicted.caps,
                retry_caps=predicted.retry_caps,
                on_result=on_result,
            )
        warmup = engine_warmup_seconds(self.engine) - warmup_before
        lengths = [record.results[request.id].length for request in runnable]
        totals = self.totals
        totals.requests += len(runnable)
        totals.token_slots += sum(executed.token_slots for executed in record.batches)
        totals.data_order_token_slots += data_order_token_slots(lengths, self.args.batch_size)
        totals.truncated += sum(not result.finished for result in record.results.values())
        totals.recomputed += sum(result.recomputed for result in record.results.values())
        totals.prediction_s += prediction_timer.seconds
        totals.generation_s += generation_timer.seconds - warmup
        totals.engine_warmup_s += warmup
        totals.oom_splits += self.executor.oom_splits - splits_before

    def refuse(self, sample_id: str, message: str, progress) -> None:
        self.writer.add(error_row(sample_id, message))
        self.writer.flush()
        self.totals.errors += 1
        progress.update(1)


def summary(totals: list[Totals], args, strategy_label: str, skipped: int, device: str) -> dict:
    """The run's summary from every process's totals: the processes ran side by side, so the run took as long as
    the slowest one."""
    requests = sum(total.requests for total in totals)
    generated = sum(total.generated_tokens for total in totals)
    slots = sum(total.token_slots for total in totals)
    data_order = sum(total.data_order_token_slots for total in totals)
    slowest = max(totals, key=lambda total: total.prediction_s + total.generation_s)
    wall = slowest.prediction_s + slowest.generation_s
    ratios = token_ratios(
        requests, slots, generated, sum(t.recomputed for t in totals), sum(t.truncated for t in totals)
    )
    return {
        "input": args.input,
        "output": args.output,
        "strategy": strategy_label,
        "predictor_path": args.predictor_path if strategy_label.startswith("proxy") else None,
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
        "settings": answer_settings(args),
    }


def print_summary(result: dict) -> None:
    lines = [
        f"answered {result['requests']} requests (errors {result['errors']}, answered before "
        f"{result['answered_before']}) with {result['strategy']} on {result['device']} in "
        f"{result['wall_time_s']:.1f} s: {result['requests_per_s']:.3f} requests/s, "
        f"{result['generated_tokens_per_s']:.1f} generated tokens/s",
        f"token slots {result['token_slots']} ({result['effective_token_ratio'] * 100:.1f} % effective); in file "
        f"order they would have been {result['data_order_token_slots']} "
        f"({result['data_order_effective_token_ratio'] * 100:.1f} % effective): scheduling saved "
        f"{result['token_slots_saved'] * 100:.1f} % of the token slots",
    ]
    if result["engine_warmup_s"]:
        lines.append(f"engine warm-up {result['engine_warmup_s']:.1f} s (compiling new shapes; not in the time above)")
    print("\n".join(lines), file=sys.stderr)


def load_replay(args, pending: list[str]) -> dict[str, int] | None:
    if not args.replay_lengths:
        return None
    table = load_length_file(args.replay_lengths, (args.replay_field,))
    require_ids(table, pending, args.replay_lengths)
    return {sample_id: int(table[sample_id][args.replay_field]) for sample_id in pending}


def main(argv: list[str] | None = None) -> dict:
    from tqdm import tqdm

    args = parse_args(argv)
    ids = check_request_file(args.input)  # a malformed file stops here, before any model loads
    processes = start_processes(args.device)
    args.device = processes.device(args.device)
    check_settings(args, len(answered_ids(args.output, repair=False)))  # in every process: all stop alike
    processes.wait()
    if processes.is_main:
        answered_ids(args.output, repair=True)  # a line a kill cut short is cut off before anything is appended
    processes.wait()  # every process reads the repaired files
    answered = answered_ids(args.output, repair=False) & set(ids)
    pending = [sample_id for sample_id in ids if sample_id not in answered]
    replay = load_replay(args, pending)
    check_model_arguments(args)  # after the file checks, so that a mistake there is named first; before any load
    context = predictor_context(args)
    predictor = None
    if not PREDICTORS[args.strategy_parsed.predictor].needs_model:  # a missing predictor fails before the model
        predictor = build_predictor(args.strategy_parsed.predictor, context)
        if PREDICTORS[args.strategy_parsed.predictor].uses_length_file:
            predictor.predict([Sample(sample_id, "", None) for sample_id in pending])  # every id has a row
    if processes.is_main:
        write_text_atomic(settings_path(args.output), json.dumps(answer_settings(args), indent=2) + "\n")
    if not pending:
        print(f"all {len(ids)} requests of {args.input} are answered in {args.output}", file=sys.stderr)
        return {"requests": 0, "answered_before": len(answered)}

    from .common.models import load_model_and_formatter
    from .engines.registry import build_engine

    model, tokenizer, formatter, model_path = load_model_and_formatter(
        args.model, args.device, args.dtype, args.lora_path, args.load_format, args.conv_template
    )
    engine = build_engine(args.engine, model, tokenizer)
    context.model, context.tokenizer, context.formatter, context.engine = model, tokenizer, formatter, engine
    if predictor is None:
        predictor = build_predictor(args.strategy_parsed.predictor, context)
    if processes.is_main:
        print(
            f"{len(pending)} requests to answer ({len(answered)} answered before) with {args.strategy_parsed.label}; "
            f"model {model_path} on {engine.device}, template {formatter.template}"
            + (f", {processes.count} processes" if processes.distributed else ""),
            file=sys.stderr,
        )
    if not args.no_warmup:  # one-off costs (allocator, kernels) before the clock starts
        engine.generate([formatter.encode("Hello")], 2, 0.0)
    executor = StaticBatchExecutor(engine, {}, args.temperature, replay)
    executor.top_p = args.top_p
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    runner = Runner(
        args,
        args.strategy_parsed,
        predictor,
        formatter,
        engine,
        executor,
        AnswerWriter(rank_path(args.output, processes.rank)),
        getattr(text_config, "max_position_embeddings", None),
        replay,
    )
    pending_set = set(pending)
    total = len(pending) if not processes.distributed else None  # each process shows its own share
    with (
        runner.writer,
        tqdm(total=total, unit="request", desc=args.strategy_parsed.label, disable=not processes.is_main) as progress,
    ):

        def runnable():  # the pending requests in file order, as a stream; the main process answers the bad ones
            for request in read_requests(args.input):
                if request.id not in pending_set:
                    continue
                if request.problem is None:
                    yield request
                elif processes.is_main:
                    runner.refuse(request.id, request.problem, progress)

        # groups are numbered in file order and shared round robin, every process reading the same file
        groups = groups_of(runnable(), args.group_size, args.max_length, args.temperature)
        for number, (cap, temperature, group) in enumerate(groups):
            if number % processes.count == processes.rank:
                runner.answer_group(cap, temperature, group, progress)
    totals = processes.gather(runner.totals)
    processes.wait()
    if not processes.is_main:
        return {}
    merge_rank_files(args.output)
    result = summary(totals, args, args.strategy_parsed.label, len(answered), engine.device)
    print_summary(result)
    if args.summary_json:
        write_json_atomic(args.summary_json, result)
    return result


if __name__ == "__main__":
    run_cli(main)
