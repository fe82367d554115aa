"""Answer a file of prompts, faster than plain batching: predict how long each answer will be, batch requests of
similar predicted length together, generate, and write each answer as it finishes.

    python -m src.infer --input prompts.jsonl --output answers.jsonl --model smollm2-135m
    python -m src.infer --input batch.jsonl --output out.jsonl --model ./ckpts/vicuna-7b --strategy gt+vbs+fcr \\
        --length-path lengths.json

Input: JSON lines or one JSON list; each record a prompt, an Alpaca record, a FastChat conversation or an OpenAI
batch line (src/common/request_file.py says which fields); a record's own max_tokens and temperature win over the
flags. Output: one JSON line per request (src/common/answers.py; an OpenAI line's in the shape of OpenAI's batch
output, src/common/openai_batch.py), appended as requests finish and flushed to disk; running the same command
again skips the ids already answered (a line a kill cut short is dropped and redone) and refuses settings that would
answer differently. A request that cannot run (an empty prompt, a prompt that leaves no room in the model's context)
gets an error line and the others run.

The default plan predicts each answer's length with the predictor that ships in the clone (Vicuna-7B's lengths on
Alpaca prompts; `python -m src.fit_proxy` fits one to your model) and runs each group with the plan this device's cost
model prices cheapest (src/running/plan.py): on the CPU's engine usually one queue, shortest predicted first, whose
rows are refilled as answers end; else batches of similar predicted length, cut at the prediction and resumed.
Under greedy decoding in float32 the schedule changes when a request runs, not its answer
(docs/INFER.md: in 16-bit types any batching, plain batching's too, changes some). Requests are read, scheduled and
written one group (`--group-size`) at a time, so memory stays bounded on large files. Under torchrun or `accelerate
launch` each process answers every K-th group into a file of its own; the main process appends them at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common.answers import (
    AnswerWriter,
    answered_ids,
    answered_rows,
    changed_answers,
    drop_answers,
    finish_output,
    lock_output,
    rank_path,
    read_run_settings,
    refuse_changed_answers,
    settings_path,
)
from .common.cli import (
    MAX_SEED,
    HelpFormatter,
    check_output_file,
    check_outputs_are_not_inputs,
    check_range,
    check_temperature,
    run_cli,
)
from .common.data import Sample, load_replay_lengths
from .common.distributed import start_processes
from .common.models import context_length, model_folder
from .common.openai_batch import OpenAIBatchOutput
from .common.request_file import OWN_SETTINGS, check_request_file
from .common.utils import GZIP_SUFFIX, UserError, resolve_device, resolve_dtype, write_json_atomic, write_text_atomic
from .engines.registry import resolve_engine_name
from .predictors.flags import add_predictor_arguments, check_predictor_arguments, predictor_context
from .predictors.proxy import SHIPPED_PROXY_PATH
from .predictors.registry import PREDICTORS, build_predictor
from .running.answering import Runner, answer_pending
from .running.cost_estimate import TYPICAL_PROMPT_TOKENS, add_device_profile_argument, describe_costs
from .running.executor import StaticBatchExecutor
from .running.plan import QUEUE_CANDIDATES, STATIC_CANDIDATES, Planner, default_plan
from .running.settings import RunSettings, parse_strategies, parse_vbs_table_flag, strategy_choices
from .running.setup import add_model_arguments, check_model_arguments, device_costs_of, load_model_with_engine
from .running.summary import print_summary, summary
from .scheduling.batches import PAPER_VBS_TABLE

# Settings that change what a request's answer is: an output written under others is not continued.
ANSWER_SETTINGS = ("model", "load_format", "dtype", "engine", "conv_template", "lora_path", "max_length")
ANSWER_SETTINGS += ("temperature", "top_p", "seed", "replay_lengths", "replay_field")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter, allow_abbrev=False)
    parser.add_argument("--input", required=True, help="requests: JSON lines or a JSON list")
    parser.add_argument("--output", required=True, help="answers: JSON lines, appended as requests finish")
    parser.add_argument("--summary-json", default=None, help="also write the summary here")
    add_model_arguments(parser)
    parser.add_argument(
        "--strategy",
        default=None,
        help=f"how requests are batched: {strategy_choices()}; default: for each group, the cheapest in the cost "
        f"model of this device (measured once, then cached) of {', '.join(QUEUE_CANDIDATES)} on the slots engine, "
        f"of {', '.join(STATIC_CANDIDATES)} on the others; without the proxy predictor, file order",
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
    parser.add_argument(
        "--output-order", choices=("finish", "input"), default="finish",
        help="finish: a line appended as each answer ends; input: the output rewritten in the input's order at the end",
    )  # fmt: skip
    parser.add_argument("--redo-changed", action="store_true", help="on a rerun, answer anew the requests edited since")
    add_device_profile_argument(parser)
    add_predictor_arguments(parser)
    parser.set_defaults(predictor_path=str(SHIPPED_PROXY_PATH))
    args = parser.parse_args(argv)
    for flag, value in (("--max-length", args.max_length), ("--batch-size", args.batch_size)):
        check_range(flag, value, 1)
    check_range("--group-size", args.group_size, 1)
    check_temperature("--temperature", args.temperature)
    check_range("--top-p", args.top_p, 0, 1, open_low=True)
    check_range("--seed", args.seed, 0, MAX_SEED)
    check_predictor_arguments(args)
    if parse_vbs_table_flag(args.vbs_table) is None:
        raise UserError("--vbs-table auto calibrates in src.benchmark; src.infer takes a table such as 50:64,100:32")
    check_paths(args)
    return args


def infer_settings(args) -> RunSettings:
    """The strategy (--strategy, or the default plan's candidates) and what it runs with; each group's cap and
    temperature are its requests' own."""
    return RunSettings(
        strategies=choose_strategies(args),
        max_length=args.max_length,
        batch_size=args.batch_size,
        slots=args.batch_size,  # a queue runs --batch-size rows
        group_size=args.group_size,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        vbs_table=parse_vbs_table_flag(args.vbs_table),
        device_profile=args.device_profile,
    )


def check_paths(args) -> None:
    """Outputs can be written and none of them is an input."""
    if args.output.endswith(GZIP_SUFFIX):  # appended line by line through a kill, which a gzip stream cannot be
        raise UserError(f"--output {args.output}: answers are appended as plain JSON lines; name it without .gz")
    check_output_file("--output", args.output)
    check_output_file("--summary-json", args.summary_json)
    inputs = {"--input": args.input, "--replay-lengths": args.replay_lengths, "--length-path": args.length_path}
    inputs |= {"--predictions-path": args.predictions_path, "--predictor-path": args.predictor_path}
    inputs |= {"--model": model_folder(args.model), "--lora-path": args.lora_path}
    outputs = {"--output": args.output, "--summary-json": args.summary_json, "settings": settings_path(args.output)}
    check_outputs_are_not_inputs(outputs, inputs)


def choose_strategies(args) -> tuple:
    """The --strategy; or the default plan's candidates, each group answered with the cheapest (`args.plan_reason`
    says why those; None with --strategy)."""
    texts, args.plan_reason = (args.strategy,), None
    if args.strategy is None:
        texts, args.plan_reason = default_plan(args)
    strategies = parse_strategies(list(texts))
    if strategies[0].predictor == "gt" and args.length_path is None:
        raise UserError("strategy gt needs --length-path: the length file of these requests")
    return strategies


# --------------------------------------------------------------------------- the output files


def answer_settings(args) -> dict:
    """What makes the answers, resolved (dtype, engine, device kind: a float16 CUDA output is never continued in float32
    on a CPU); a flag None where every record gives its own (request_file.OWN_SETTINGS)."""
    settings = {key: getattr(args, key) for key in ANSWER_SETTINGS}
    device = resolve_device(args.device)
    settings["dtype"] = str(resolve_dtype(args.dtype, device)).removeprefix("torch.")
    settings["engine"] = resolve_engine_name(args.engine, device)
    settings["device_type"] = device.split(":")[0]
    every = len(args.requests.fingerprints)  # a flag every record overrides changes no answer: a rerun may change it
    settings |= {key: None for key, count in args.requests.own_settings.items() if count == every}
    return settings


def check_settings(args, answered: int) -> None:
    """An output that holds answers continues only under the settings that made them."""
    path, settings = settings_path(args.output), answer_settings(args)
    if not answered:
        return
    earlier = read_run_settings(path)
    if isinstance(earlier, dict):  # a flag recorded as None (every record had its own) made no kept answer
        earlier |= {key: settings[key] for key in OWN_SETTINGS if earlier.get(key, 0) is None}
    if earlier != settings:
        different = (
            [key for key in settings if earlier.get(key) != settings[key]]
            if isinstance(earlier, dict)
            else [f"{path} is missing or unreadable"]
        )
        raise UserError(
            f"{args.output} holds {answered} answers made with other settings ({', '.join(different)}): rerun with "
            "those settings, or choose another --output"
        )


# --------------------------------------------------------------------------- the run


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    settings = infer_settings(args)
    args.requests = check_request_file(args.input)  # a malformed file stops here
    if args.replay_lengths is not None and args.requests.stopped:
        raise UserError(
            f"--replay-lengths ends every answer at its recorded length, and {args.requests.stopped} records of "
            f"{args.input} give stop strings: remove their stop, or the flag"
        )
    ids = args.requests.fingerprints  # id -> what it asks, in file order
    processes = start_processes(args.device)
    args.device = processes.device(args.device)
    lock = lock_output(args.output, processes)  # before the output is read: a second run must not repair it
    try:
        return answer_requests(args, settings, ids, processes)
    finally:
        if lock is not None:
            lock.__exit__(None, None, None)


def answer_requests(args, settings: RunSettings, ids: dict[str, str], processes) -> dict:
    """Every pending request answered into the output (the lock held), and the run's summary."""
    strategy = settings.strategies[0]
    answered, pending = pending_ids(args, ids, processes)
    replay = load_replay_lengths(args.replay_lengths, args.replay_field, pending)
    check_model_arguments(args)  # after the file checks, so that a mistake there is named first; before any load
    context = predictor_context(args)
    # every group clamps its predictions to its own cap, which a record's max_tokens may set above --max-length
    context.max_length = max(args.max_length, args.requests.largest_cap or 0)
    predictor = None
    if pending and not PREDICTORS[strategy.predictor].needs_model:  # a missing predictor fails before the model
        predictor = build_predictor(strategy.predictor, context)
        if PREDICTORS[strategy.predictor].reads_ids_from_file:
            predictor.predict([Sample(sample_id, "", None) for sample_id in pending])  # every id has a row
    if processes.is_main:
        write_text_atomic(settings_path(args.output), json.dumps(answer_settings(args), indent=2) + "\n")
    if not pending:
        if processes.is_main:  # a run killed during its merge left answers in other processes' files
            finish_output(args.output, list(ids) if args.output_order == "input" else None)
        print(f"all {len(ids)} requests of {args.input} are answered in {args.output}", file=sys.stderr)
        return {"requests": 0, "answered_before": len(answered)}

    loaded = load_model_with_engine(args, context)
    predictor = predictor or build_predictor(strategy.predictor, context)
    settings = settings.with_predictors({strategy.predictor: predictor})
    planned = len(settings.strategies) > 1  # the default plan: each group's strategy the cheapest of these
    label = "plan" if planned else strategy.label
    if processes.is_main:
        how = f"the cheapest per group of {', '.join(s.label for s in settings.strategies)}" if planned else label
        print(
            f"{len(pending)} requests to answer ({len(answered)} answered before) with {how}; "
            f"model {loaded.path} on {loaded.engine.device}, template {loaded.formatter.template}"
            + (f", {processes.count} processes" if processes.distributed else ""),
            file=sys.stderr,
        )
        if not planned and args.plan_reason:  # the default fell back to file order: say why, and how to fix it
            print(f"plan: {label}, because {args.plan_reason}", file=sys.stderr)
    if not args.no_warmup:  # one-off costs (allocator, kernels) before the clock starts
        loaded.engine.generate([loaded.formatter.encode("Hello")], 2, 0.0)
    executor = StaticBatchExecutor(loaded.engine, {}, args.temperature, replay, top_p=args.top_p)
    endpoints = args.requests.endpoints  # OpenAI batch lines are answered in the shape of OpenAI's output
    openai_output = OpenAIBatchOutput(endpoints, Path(args.model).name, label) if endpoints else None
    writer = AnswerWriter(rank_path(args.output, processes.rank), ids, openai_output)
    runner = Runner(
        settings, predictor, loaded.formatter, loaded.engine, executor, writer, context_length(loaded.model)
    )
    plan_with_device_costs(runner, args.plan_reason if planned else None, processes)
    answer_pending(runner, args, label, set(pending), processes)
    totals = processes.gather(runner.totals)
    processes.wait()
    if not processes.is_main:
        return {}
    finish_output(args.output, list(ids) if args.output_order == "input" else None)
    result = summary(totals, args, label, len(answered), loaded.engine.device, answer_settings(args))
    print_summary(result)
    if args.summary_json:
        write_json_atomic(args.summary_json, result)
    return result


def plan_with_device_costs(runner: Runner, plan_reason: str | None, processes) -> None:
    """The runner's cost model (for the summary's estimate, and the default plan's prices where `plan_reason` says
    why its candidates are those): measured once, before the clock starts, so that every process estimates alike."""
    costs = None
    if processes.is_main:
        costs = device_costs_of(runner.settings, runner.engine, TYPICAL_PROMPT_TOKENS, plan_reason is not None)
        if costs is not None:
            print(describe_costs(costs), file=sys.stderr)
    runner.device_costs = processes.broadcast(costs)
    if plan_reason is not None:
        runner.planner, runner.plan_reason = Planner(runner.settings, runner.device_costs), plan_reason


def pending_ids(args, ids: dict[str, str], processes) -> tuple[set[str], list[str]]:
    """The ids answered before (under the same settings, else refused) and those still to answer, in file order;
    a line a kill cut short is cut off first."""
    output = Path(args.output)
    if output.is_file() and output.stat().st_size and not settings_path(args.output).is_file():
        raise UserError(
            f"{output} holds lines that no src.infer run wrote (it has no {settings_path(args.output).name} beside "
            "it): choose another --output, or move that file away"
        )
    check_settings(args, len(answered_ids(args.output, repair=False)))  # in every process: all stop alike
    processes.wait()
    if processes.is_main:
        answered_ids(args.output, repair=True)  # a line a kill cut short is cut off before anything is appended
    processes.wait()  # every process reads the repaired files
    kept = answered_rows(args.output)
    changed = changed_answers(kept, ids)
    if not args.redo_changed:
        refuse_changed_answers(changed, args.output, args.input)
    elif changed and processes.is_main:
        drop_answers(args.output, changed)
    processes.wait()
    answered = (set(kept) - set(changed)) & set(ids)
    return answered, [sample_id for sample_id in ids if sample_id not in answered]


if __name__ == "__main__":
    run_cli(main)
