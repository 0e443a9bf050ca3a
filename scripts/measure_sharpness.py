"""Measure the sharpness of trained runs: each checkpoint and the final model, on the run's own evaluation data.

    python scripts/measure_sharpness.py runs/vit_digits runs/vit_digits_no_sam --output runs/sharpness.png
    python scripts/measure_sharpness.py runs/a --final_only --measures top_eigenvalue trace m_sharpness
    python scripts/measure_sharpness.py runs/a --rho 0.5 --adaptive --m 16 --json runs/a_sharpness.json

Each RUN_DIR is the output folder of scripts/train_vit.py, train_lm.py or train_text_cls.py. The run's
evaluation data is rebuilt by the training script itself: the command recorded in the run's model card
(README.md) is replayed up to the point where the trainer would be built, which yields the validation
set, the data collator and the model class exactly as in training (nothing is trained, nothing is
written to the run). The weights of every checkpoint-<step> folder (in step order) and of the final
model are then loaded and measured on the first --max_samples validation examples, in evaluation mode:

- top_eigenvalue: lambda_max, the largest Hessian eigenvalue (Lanczos, at most --iters products);
- trace: the Hessian trace (Hutchinson, --samples products);
- m_sharpness: mean over chunks of --m samples of L(w + e) - L(w), e = rho g / ||g|| (--adaptive: ASAM's).

The script prints a table, and writes a PNG with one panel per measure against the training step
(one line per run) and, with --json, the numbers.
"""

import argparse
import importlib.util
import json
import math
import re
import shlex
import tempfile
import time
from itertools import islice
from pathlib import Path

from hf_sam_scripts.errors import ScriptError, run_main
from hf_sam_scripts.plots import draw_panels

REPO_DIR = Path(__file__).resolve().parent.parent

MEASURES = ("top_eigenvalue", "trace", "m_sharpness")
# flags of the recorded command that would write to (or read from) the run: replaced or dropped on replay
_DROPPED = {"--output_dir", "--resume_from_checkpoint", "--overwrite_output_dir", "--push_to_hub", "--hub_model_id",
            "--report_to", "--run_name", "--logging_dir"}


class _Captured(Exception):
    """Raised by the stand-in trainer once the script has built everything a trainer gets."""

    def __init__(self, kwargs):
        super().__init__("captured")
        self.kwargs = kwargs


# -----------------------------------------------------------------------------
# Runs: the recorded command, the checkpoints


def recorded_command(run_dir):
    """The training command of a run, from the `python scripts/...` line of its model card."""
    card = Path(run_dir) / "README.md"
    if not card.is_file():
        raise ScriptError(f"{run_dir} holds no model card (README.md) with the training command: is it the "
                          "output_dir of a finished run of scripts/train_*.py? Pass the command with --command.")
    for line in card.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if re.match(r"^(python\d?|accelerate launch|torchrun)\b.*\btrain_\w+\.py\b", line):
            return line
    raise ScriptError(f"{card} holds no `python scripts/train_*.py ...` line; pass the command with --command.")


def split_command(command):
    """(script path, its arguments) from a recorded command (launchers and their flags skipped)."""
    words = shlex.split(command)
    for i, word in enumerate(words):
        if word.endswith(".py"):
            return word, words[i + 1:]
    raise ScriptError(f"no .py script in the command {command!r}.")


def replay_argv(argv, output_dir):
    """The recorded arguments, minus the flags that write to the run (and their values), plus a scratch output_dir."""
    out, dropping = [], False
    for word in argv:
        if word.startswith("--"):
            dropping = word.split("=", 1)[0] in _DROPPED and "=" not in word
            if word.split("=", 1)[0] in _DROPPED:
                continue
        elif dropping:
            continue
        out.append(word)
    return out + ["--output_dir", str(output_dir), "--report_to", "none"]


def _resolve(path):
    """A relative path of the recorded command: against the current folder, then the repository."""
    path = Path(path)
    if path.is_absolute() or path.exists():
        return path
    return REPO_DIR / path


def final_step(folder):
    state = Path(folder) / "trainer_state.json"
    if state.is_file():
        return json.loads(state.read_text(encoding="utf-8")).get("global_step")
    return None


def model_folders(run_dir, final_only=False):
    """[(label, step, folder)]: checkpoint-<step> folders in step order, then the final model."""
    run_dir = Path(run_dir)
    out = []
    if not final_only:
        checkpoints = [p for p in run_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
        for p in sorted(checkpoints, key=lambda p: int(p.name.split("-")[-1])):
            out.append((p.name, int(p.name.split("-")[-1]), p))
    has_final = any((run_dir / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json",
                                                      "pytorch_model.bin", "adapter_model.safetensors"))
    if has_final:
        out.append(("final", final_step(run_dir), run_dir))
    if not out:
        raise ScriptError(f"{run_dir} holds neither a final model nor checkpoint-* folders.")
    return out


# -----------------------------------------------------------------------------
# Rebuilding the evaluation data with the training script


def rebuild(script, argv, scratch):
    """Run the training script until it builds its trainer; returns the trainer's keyword arguments."""
    from transformers import Trainer

    path = _resolve(script)
    if not path.is_file():
        raise ScriptError(f"the recorded script {script} does not exist (looked in {path}).")
    spec = importlib.util.spec_from_file_location(f"_replayed_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def capture(self, *args, **kwargs):  # every Trainer subclass ends in Trainer.__init__
        raise _Captured(kwargs)

    if not (hasattr(module, "main") and hasattr(module, "parse_args")):
        raise ScriptError(f"{path} has no parse_args(argv) and main(...) to replay.")
    argv = [str(_resolve(a)) if a.endswith((".yaml", ".yml")) else a for a in argv]
    original = Trainer.__init__
    Trainer.__init__ = capture
    try:
        module.main(*module.parse_args(replay_argv(argv, scratch)))
    except _Captured as captured:
        return captured.kwargs
    finally:
        Trainer.__init__ = original
    raise ScriptError(f"{path} finished without building a trainer; cannot rebuild its evaluation data.")


def load_weights(model, folder):
    """The captured (freshly built) model with the weights of `folder`."""
    try:
        from peft import PeftModel, set_peft_model_state_dict
    except ImportError:  # pragma: no cover - peft is a dependency of the scripts' LoRA path only
        PeftModel = None
    folder = Path(folder)
    if PeftModel is not None and isinstance(model, PeftModel):
        from safetensors.torch import load_file

        adapter = folder / "adapter_model.safetensors"
        if not adapter.is_file():
            raise ScriptError(f"{folder}: the run trained LoRA adapters but holds no adapter_model.safetensors.")
        set_peft_model_state_dict(model, load_file(str(adapter)))
        return model
    return type(model).from_pretrained(str(folder))


def evaluation_batches(kwargs, model, batch_size, max_samples):
    """The first max_samples examples of the run's validation set, batched as the Trainer batches them."""
    from transformers import Trainer

    args = kwargs["args"]
    args.per_device_eval_batch_size = batch_size
    if kwargs.get("eval_dataset") is None:
        raise ScriptError("the training script built no eval_dataset: nothing to measure on.")
    trainer = Trainer(model=model, args=args, eval_dataset=kwargs["eval_dataset"],
                      data_collator=kwargs.get("data_collator"), processing_class=kwargs.get("processing_class"))
    loader = trainer.get_eval_dataloader()
    n = None if max_samples is None else math.ceil(max_samples / batch_size)
    batches = list(islice(loader, n))
    if max_samples is not None:
        keep, out = max_samples, []
        for b in batches:
            size = next(v.shape[0] for v in b.values() if hasattr(v, "shape") and v.dim() > 0)
            out.append(b if size <= keep else {k: v[:keep] if hasattr(v, "shape") and v.dim() > 0 else v
                                              for k, v in b.items()})
            keep -= min(size, keep)
            if keep == 0:
                break
        batches = out
    return batches, trainer.args.device


# -----------------------------------------------------------------------------
# Measuring, the table and the plot


def measure_model(model, batches, args):
    from hf_sam import sharpness

    out = {}
    if "top_eigenvalue" in args.measures:
        out["top_eigenvalue"] = sharpness.hessian_eigenvalues(model, batches, 1, iters=args.iters, tol=args.tol,
                                                              seed=args.seed, method=args.method, which="largest",
                                                              max_seconds=args.max_seconds)[0]
    if "trace" in args.measures:
        out["trace"], out["trace_stderr"] = sharpness.hessian_trace(model, batches, samples=args.samples,
                                                                    seed=args.seed, return_stderr=True,
                                                                    max_seconds=args.max_seconds)
    if "m_sharpness" in args.measures:
        out["m_sharpness"] = sharpness.m_sharpness(model, batches, args.rho, m=args.m, adaptive=args.adaptive,
                                                   eta=args.eta, seed=args.seed, max_seconds=args.max_seconds)
    return out


def measure_runs(args):
    """[{run, label, step, <measure>: value, seconds}] for every model folder of every run."""
    rows = []
    for run in args.runs:
        run_dir = Path(run)
        folders = model_folders(run_dir, args.final_only)
        script, argv = split_command(args.command or recorded_command(run_dir))
        with tempfile.TemporaryDirectory() as scratch:
            kwargs = rebuild(script, argv, scratch)
            built = kwargs["model"]
            batches = device = None
            for label, step, folder in folders:
                model = load_weights(built, folder)
                if batches is None:
                    batches, device = evaluation_batches(kwargs, model, args.batch_size, args.max_samples)
                model.to(device)
                start = time.perf_counter()
                values = measure_model(model, batches, args)
                rows.append({"run": run_dir.name, "path": str(run_dir), "label": label, "step": step, **values,
                             "seconds": time.perf_counter() - start})
                print(format_row(rows[-1], args.measures), flush=True)
    return rows


def format_header(measures):
    return f"{'run':<24} {'model':<16} {'step':>7} " + " ".join(f"{m:>15}" for m in measures) + f" {'seconds':>8}"


def format_row(row, measures):
    cells = []
    for m in measures:
        value = f"{row[m]:.5g}" if m in row else "-"
        if m == "trace" and "trace_stderr" in row:
            value = f"{row[m]:.4g}+-{row['trace_stderr']:.2g}"
        cells.append(f"{value:>15}")
    step = "?" if row["step"] is None else row["step"]
    return f"{row['run'][:24]:<24} {row['label'][:16]:<16} {step:>7} " + " ".join(cells) + f" {row['seconds']:>8.2f}"


def plot(rows, measures, output):
    """One panel per measure against the training step, one line per run."""
    runs = list(dict.fromkeys(r["path"] for r in rows))
    panels = []
    for measure in measures:
        lines = []
        for run in runs:
            points = sorted((r["step"], r[measure]) for r in rows
                            if r["path"] == run and r.get(measure) is not None and r["step"] is not None)
            lines.append((Path(run).name, [s for s, _ in points], [v for _, v in points]))
        panels.append((measure, lines))
    return draw_panels(panels, output, xlabel="training step", columns=len(measures))


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="output folders of scripts/train_*.py runs")
    p.add_argument("--measures", nargs="+", default=["top_eigenvalue", "m_sharpness"], choices=MEASURES,
                   help="what to measure (default: top_eigenvalue m_sharpness)")
    p.add_argument("--final_only", action="store_true", help="measure the final models only, not the checkpoints")
    p.add_argument("--max_samples", type=int, default=512, help="validation examples measured on (default: 512)")
    p.add_argument("--batch_size", type=int, default=64,
                   help="examples per batch; the loss is the mean of the batch losses (default: 64)")
    p.add_argument("--rho", type=float, default=0.05, help="m-sharpness radius (default: 0.05)")
    p.add_argument("--m", type=int, default=None, help="m-sharpness chunk size (default: the whole batch)")
    p.add_argument("--adaptive", action="store_true", help="m-sharpness in ASAM's |w|-scaled form")
    p.add_argument("--eta", type=float, default=0.01, help="ASAM's eta for --adaptive (default: 0.01)")
    p.add_argument("--iters", type=int, default=100, help="most Hessian-vector products for the top eigenvalue "
                                                          "(default: 100)")
    p.add_argument("--tol", type=float, default=1e-3,
                   help="stop when the residual ||Hv - lambda v|| is below tol * |lambda| (default: 1e-3)")
    p.add_argument("--method", choices=["lanczos", "power"], default="lanczos",
                   help="eigenvalue method; power holds 2 vectors instead of up to --iters (default: lanczos)")
    p.add_argument("--samples", type=int, default=50, help="Hutchinson samples for the trace (default: 50)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random vectors (default: 0)")
    p.add_argument("--max_seconds", type=float, default=None,
                   help="stop each measure before a product that would overrun this many seconds (default: none)")
    p.add_argument("--command", default=None,
                   help="the training command to replay for the data, when the run folder has no model card")
    p.add_argument("--output", "-o", default="sharpness.png", help="PNG to write (default: sharpness.png)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.m is not None and args.m < 1 or args.batch_size < 1 or (args.max_samples or 1) < 1:
        raise ScriptError("--m, --batch_size and --max_samples must be positive.")
    if args.max_seconds is not None and not args.max_seconds > 0:
        raise ScriptError(f"--max_seconds {args.max_seconds:g}: a positive number of seconds (or leave it out).")
    for run in args.runs:
        if not Path(run).is_dir():
            raise ScriptError(f"{run} is not a run folder.")
    print(format_header(args.measures), flush=True)
    rows = measure_runs(args)
    path = plot(rows, args.measures, args.output)
    print(f"wrote {path}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
        print(f"wrote {args.json}")
    return rows


if __name__ == "__main__":
    run_main(main)
