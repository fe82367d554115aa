"""Setting a run up: the model flags every command that loads a model shares, loading the model with its formatter
and engine (once, for the predictors and the generation alike), and the executors a benchmark runs strategies on."""

from __future__ import annotations

from dataclasses import dataclass

from ..common.distributed import Processes
from ..common.models import SMOLLM2_ALIAS, VICUNA_SHAPE_ALIAS, check_adapter_path, check_model_name
from ..common.utils import UserError
from ..engines.base import Engine
from ..engines.registry import AUTO_ENGINE, DEFAULT_ENGINE, engine_names
from ..predictors.registry import PREDICTORS, build_predictor
from ..scheduling.cost_model import load_profiles
from ..scheduling.vbs_choice import CANDIDATE_BATCH_SIZES
from .cost_estimate import MEASURE, cached_costs, describe_costs, dry_run_costs, measured_costs
from .executor import StaticBatchExecutor
from .runner import Executors
from .settings import RunSettings


def add_model_arguments(parser) -> None:
    """The flags every CLI that loads a model shares."""
    parser.add_argument(
        "--model",
        default="./ckpts/vicuna-7b",
        help=f"local folder, hub id, or an offline alias: {SMOLLM2_ALIAS} (the packaged SmolLM2-135M-Instruct) or "
        f"{VICUNA_SHAPE_ALIAS} (Vicuna-7B's architecture without weights, with --load-format dummy), built once into "
        "$XDG_CACHE_HOME/length-scheduling/models (else ~/.cache/...)",
    )
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="weights dtype; auto is float16 on CUDA/MPS (as the paper) and float32 on CPU",
    )
    parser.add_argument(
        "--load-format",
        default="auto",
        choices=["auto", "dummy"],
        help="dummy keeps the architecture and tokenizer but draws random weights (system measurements only)",
    )
    parser.add_argument(
        "--engine",
        default=DEFAULT_ENGINE,
        choices=[AUTO_ENGINE, *engine_names()],
        help="how the model runs (src/engines/registry.py): transformers = eager generate and its continuous "
        "batching; compiled, graph and captured = one static-cache engine with kept caches per batch shape, told apart "
        "by their decode step: compiled = generate with its step compiled by torch.compile (CUDA graphs on a GPU); "
        "graph = the engine's own loop, the whole step one compiled function, no wait for the device between steps; "
        "captured = that loop with its eager step captured in CUDA graphs, nothing compiled (graph and captured: not "
        "yet run on a GPU, on no default path); slots = transformers' static batches, and continuous batching by its "
        "own loop that gives a finished answer's row of a static cache to the next request; "
        "auto = compiled on CUDA, slots elsewhere",
    )
    parser.add_argument(
        "--conv-template",
        default=None,
        help="fastchat template name, or chat_template for the tokenizer's own; "
        "default: vicuna_v1.1 for Vicuna models, else the tokenizer's chat template",
    )


def check_model_arguments(args, needs_model: bool = True) -> None:
    """Before any load: --model names a model's folder (when the command will load one) and --lora-path an adapter."""
    if needs_model:
        check_model_name("--model", args.model)
    check_adapter_path("--lora-path", getattr(args, "lora_path", None))  # lenpred has none


@dataclass(frozen=True)
class LoadedModel:
    model: object
    tokenizer: object
    formatter: object  # src.common.prompts: the conversation template that turns a prompt into token ids
    path: str  # the folder the weights came from
    engine: Engine


def load_model_with_engine(args, context=None) -> LoadedModel:
    """The model of the flags of `add_model_arguments` (and --lora-path), its formatter and its engine; given a
    PredictorContext, the generative predictors (po, seqsch) get the same model and engine through it."""
    from ..common.models import load_model_and_formatter
    from ..engines.registry import build_engine

    model, tokenizer, formatter, path = load_model_and_formatter(
        args.model, args.device, args.dtype, getattr(args, "lora_path", None), args.load_format, args.conv_template
    )
    loaded = LoadedModel(model, tokenizer, formatter, path, build_engine(args.engine, model, tokenizer))
    if context is not None:
        context.model, context.tokenizer, context.formatter, context.engine = (
            model,
            tokenizer,
            formatter,
            loaded.engine,
        )
    return loaded


def attach_model_if_needed(args, context, strategy: str) -> str:
    """Load the model into `context` when the predictor generates (po, seqsch); returns the device the predictions
    run on (the proxy's own, else the CPU)."""
    if not PREDICTORS[strategy].needs_model:
        return context.options["predictor_device"] if strategy == "proxy" else "cpu"
    return load_model_with_engine(args, context).engine.device


def prepare_executors(
    settings: RunSettings, loaded: LoadedModel, samples, replay, processes: Processes, warmup: bool = True
) -> Executors:
    """The generation executors of a benchmark's samples on the loaded engine, after an untimed warm-up call and,
    for --vbs-table auto, the device's calibration. Under several processes each prepares its own samples and the
    main one calibrates for all."""
    engine = loaded.engine
    prompt_ids = {sample.id: loaded.formatter.encode(sample.prompt) for sample in samples}
    if warmup:  # the first call pays one-off costs (allocator, kernels) that no strategy should carry
        engine.generate([prompt_ids[samples[0].id]], 2, settings.temperature)
        if engine.warmup_seconds and processes.is_main:
            print(f"engine {engine.name}: first compilation {engine.warmup_seconds:.1f} s, before any strategy")
    run_batch = StaticBatchExecutor(
        engine, prompt_ids, settings.temperature, replay, settings.debug, settings.inject_oom_above, settings.top_p
    )

    def run_continuous(order, slots, on_result):
        return engine.run_queue(
            order,
            prompt_ids,
            settings.max_length,
            slots,
            settings.temperature,
            replay,
            on_result,
            settings.seed,
            settings.continuous_speed,
            settings.top_p if settings.temperature > 0 else 1.0,
        )

    mean_prompt_length = sum(len(ids) for ids in prompt_ids.values()) / len(prompt_ids)
    step_costs, calibration = None, None
    if settings.vbs_table is None and any(strategy.vbs for strategy in settings.strategies):
        step_costs, calibration = calibrate_vbs(engine, round(mean_prompt_length) + settings.max_length, processes)
    prompt_lengths = {sample_id: len(ids) for sample_id, ids in prompt_ids.items()}
    device_costs = None
    if processes.is_main:  # timed once, so that every process estimates with the same costs
        device_costs = device_costs_of(settings, engine, round(mean_prompt_length))
        if device_costs is not None:
            print(describe_costs(device_costs))
    return Executors(
        run_batch,
        run_continuous,
        engine,
        step_costs,
        mean_prompt_length,
        calibration,
        prompt_lengths,
        processes.broadcast(device_costs if processes.is_main else None),
        prompt_lengths,
    )


def dry_run_executors(run_batch, device_profile: str | None, samples) -> Executors:
    """The dry run's: batches replayed, and with a device profile, seconds estimated over approximate prompts."""
    device_costs, prompt_tokens = dry_run_costs(device_profile, samples)
    return Executors(run_batch, device_costs=device_costs, cost_prompt_tokens=prompt_tokens)


def device_costs_of(settings: RunSettings, engine: Engine, prompt_tokens: int, planned: bool = False):
    """--device-profile's cost model on a real run: a named one, or this engine's, timed now at the batch sizes up to
    the largest this run asks for (the slots, the batch size, the VBS table's largest). Without the flag, none; but
    a `planned` run (src.infer's default plan) prices its plans with this engine's, from the cache where it is."""
    if settings.device_profile is None and not planned:
        return None
    if settings.device_profile not in (None, MEASURE):
        return load_profiles()[settings.device_profile]
    largest = max(settings.batch_size, settings.slots if isinstance(settings.slots, int) else 0)
    if any(strategy.vbs for strategy in settings.strategies):
        largest = max(largest, *(settings.vbs_table or {0: max(CANDIDATE_BATCH_SIZES)}).values())
    largest = min(largest, largest_calibrated_batch(engine))
    # the growth with the context is linear: 128 steps show it at a CPU's cost
    new_tokens = min(settings.max_length, 128)
    if settings.device_profile is None:
        return cached_costs(engine, largest, prompt_tokens, new_tokens)
    return measured_costs(engine, largest, prompt_tokens, new_tokens)


def largest_calibrated_batch(engine: Engine) -> int:
    """The largest batch size a calibration times: on a CPU its prefills of more than 64 rows take minutes, and
    larger sizes are extrapolated."""
    return max(CANDIDATE_BATCH_SIZES) if engine.device.startswith("cuda") else 64


def calibrate_vbs(engine: Engine, longest_context: int, processes: Processes):
    """--vbs-table auto's step costs, timed once in the main process so that every process plans from the same
    costs; returns them and what the JSON records of them."""
    from .vbs_calibration import describe, timed_calibration

    largest = largest_calibrated_batch(engine)
    step_costs = seconds = None
    if processes.is_main:
        step_costs, seconds = timed_calibration(engine, largest, longest_context)
    step_costs, seconds = processes.broadcast((step_costs, seconds) if processes.is_main else None)
    if processes.is_main:
        print(describe(step_costs, seconds))
    return step_costs, step_costs.to_json() | {"seconds": seconds}


def build_predictors_without_model(args, settings: RunSettings, context, all_samples) -> dict:
    """The predictors that need no model, built (and a length file's ids checked) before the model loads, so that
    a missing predictor or id fails fast."""
    predictors = {}
    for strategy in settings.strategies:
        kind = PREDICTORS[strategy.predictor]
        if args.dry_run and kind.needs_model:
            raise UserError(f"strategy {strategy.predictor} needs a model and cannot run with --dry-run")
        if strategy.predictor not in predictors and not kind.needs_model:
            predictors[strategy.predictor] = build_predictor(strategy.predictor, context)
            if kind.reads_ids_from_file:
                predictors[strategy.predictor].predict(all_samples)  # checks every id has a row
    return predictors
