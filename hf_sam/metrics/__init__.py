"""Metric modules for `evaluate` that load offline.

`evaluate.load("accuracy")` downloads the metric script from the Hub. The scripts here are local
copies that `evaluate.load(path)` reads from disk, so evaluation works without network:

    import evaluate
    from hf_sam.metrics import load_metric, metric_path
    accuracy = evaluate.load(metric_path("accuracy"))    # or simply: load_metric("accuracy")
"""

from pathlib import Path

_HERE = Path(__file__).resolve().parent


def available() -> list[str]:
    """Names of the metric modules shipped with hf_sam."""
    return sorted(p.stem for p in _HERE.glob("*.py") if not p.stem.startswith("_"))


def metric_path(name: str = "accuracy") -> str:
    """Path of the bundled metric module `name` (e.g. "accuracy"), for `evaluate.load(path)`."""
    path = _HERE / f"{name}.py"
    if not path.is_file():
        raise ValueError(f"hf_sam ships no metric named {name!r}; bundled metrics: {', '.join(available())}. "
                         "Pass a Hub name or a path to a metric script to evaluate.load instead.")
    return str(path)


def load_metric(name: str = "accuracy", **kwargs):
    """`evaluate.load` that prefers hf_sam's bundled copy of a metric, so it works offline.

    A name hf_sam ships (see `available()`) loads the local module; anything else (a Hub id such as
    "evaluate-metric/f1", or a path to a metric script) goes to `evaluate.load` unchanged.
    """
    import evaluate

    if name in available():
        return evaluate.load(metric_path(name), **kwargs)
    return evaluate.load(name, **kwargs)
