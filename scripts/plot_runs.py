"""Plot several training runs side by side from their `trainer_state.json`.

    python scripts/plot_runs.py runs/vit_digits runs/vit_digits_no_sam --output runs/compare.png
    python scripts/plot_runs.py runs/a/checkpoint-400/trainer_state.json runs/b --labels "SAM" "AdamW"

Each RUN is an output folder (its trainer_state.json, or else the one of its newest checkpoint) or a
trainer_state.json file. The PNG has four panels over optimizer steps: training loss, eval loss,
eval accuracy (eval perplexity for language models) and `sam/sharpness` (the loss increase
L(w + e) - L(w) that SAMTrainer logs), one line per run and a legend. Panels without data say so.
Runs that logged `sharpness/*` measurements (hf_sam.SharpnessCallback, `--sam_measure`) get one more
panel per measurement (top eigenvalue, trace, m-sharpness).
"""

import argparse
import json
import math
import sys
from pathlib import Path

from hf_sam_scripts.plots import draw_panels

# (title, how to read the value from one log_history entry)
PANELS = [
    ("training loss", lambda e: e.get("loss")),
    ("eval loss", lambda e: e.get("eval_loss")),
    ("eval accuracy", lambda e: e.get("eval_accuracy")),
    ("sam/sharpness", lambda e: e.get("sam/sharpness")),
]
PERPLEXITY_PANEL = ("eval perplexity", lambda e: e.get("eval_perplexity") or (
    math.exp(min(e["eval_loss"], 50.0)) if "eval_loss" in e else None))


def find_state_file(run):
    """trainer_state.json of a run folder (or of its newest checkpoint), or the file itself."""
    path = Path(run)
    if path.is_file():
        return path
    if not path.is_dir():
        raise SystemExit(f"error: {run} is neither a run folder nor a trainer_state.json file.")
    if (path / "trainer_state.json").is_file():
        return path / "trainer_state.json"
    def step_of(state_file):  # checkpoint-<step>
        suffix = state_file.parent.name.rsplit("-", 1)[-1]
        return int(suffix) if suffix.isdigit() else -1

    checkpoints = sorted(path.glob("checkpoint-*/trainer_state.json"), key=step_of)
    if not checkpoints:
        raise SystemExit(f"error: {run} holds no trainer_state.json (nor checkpoint-*/trainer_state.json).")
    return checkpoints[-1]


def load_history(state_file):
    try:
        state = json.loads(Path(state_file).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise SystemExit(f"error: cannot read {state_file}: {err}") from None
    history = state.get("log_history") if isinstance(state, dict) else None
    if not isinstance(history, list):
        raise SystemExit(f"error: {state_file} has no log_history list; is it a Trainer's trainer_state.json?")
    return history


def default_label(state_file):
    """The run folder's name (skipping checkpoint-* folders)."""
    folder = Path(state_file).resolve().parent
    if folder.name.startswith("checkpoint-"):
        folder = folder.parent
    return folder.name


def series(history, read):
    """(steps, values) of one metric over the log history."""
    points = [(e.get("step"), read(e)) for e in history]
    points = [(s, v) for s, v in points if s is not None and v is not None and math.isfinite(v)]
    return [s for s, _ in points], [v for _, v in points]


def sharpness_panels(histories):
    """One (title, reader) per `sharpness/*` key logged by any of the runs, in a fixed order."""
    keys = sorted({k for h in histories for e in h for k in e if k.startswith("sharpness/")})
    return [(key, lambda e, key=key: e.get(key)) for key in keys]


def plot_runs(runs, output, labels=None, title=None):
    """Write the PNG for the given runs; returns the path. Usable from Python as well as the command line."""
    state_files = [find_state_file(r) for r in runs]
    histories = [load_history(f) for f in state_files]
    labels = list(labels) if labels else [default_label(f) for f in state_files]
    if len(labels) != len(runs):
        raise SystemExit(f"error: {len(labels)} labels for {len(runs)} runs.")

    panels = list(PANELS)
    has_accuracy = any(series(h, PANELS[2][1])[0] for h in histories)
    if not has_accuracy:  # language models: show perplexity instead of accuracy
        panels[2] = PERPLEXITY_PANEL
    panels += sharpness_panels(histories)
    drawn = [(name, [(label, *series(history, read)) for history, label in zip(histories, labels)])
             for name, read in panels]
    return draw_panels(drawn, output, title=title or "runs: " + ", ".join(labels))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders or trainer_state.json files")
    parser.add_argument("--output", "-o", default="runs.png", help="PNG file to write (default: runs.png)")
    parser.add_argument("--labels", nargs="+", default=None, help="legend labels, one per run (default: folder names)")
    parser.add_argument("--title", default=None, help="figure title")
    args = parser.parse_args(argv)
    path = plot_runs(args.runs, args.output, labels=args.labels, title=args.title)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
