"""Length predictors, importable: `load_predictor()` gives the predictor that ships in the clone (or one that
`python -m src.train_proxy` or `src.fit_proxy` saved), whose lengths come clamped to [1, max_length].

    from src.predictors import Sample, load_predictor

    predictor = load_predictor(max_length=256)
    lengths = predictor.predict([Sample("q1", "Name three rivers.", None)])  # {"q1": 87}
    caps = predictor.predict_quantile(samples, 0.9)                           # an upper quantile, for FCR caps
"""

from __future__ import annotations

from ..common.data import Sample


def load_predictor(path: str | None = None, max_length: int = 512, device: str = "cpu", batch_size: int = 128):
    """The proxy predictor saved in `path` (default: the one that ships), predicting at most `max_length` tokens;
    its `predict(samples)` gives id -> length, and `predict_quantile(samples, level)` an upper quantile."""
    from .proxy import SHIPPED_PROXY_PATH
    from .registry import PredictorContext, build_predictor

    options = {"predictor_path": str(path or SHIPPED_PROXY_PATH), "predictor_device": device}
    options["prediction_batch_size"] = batch_size
    return build_predictor("proxy", PredictorContext(max_length=max_length, options=options))


__all__ = ["Sample", "load_predictor"]
