"""What happens around `trainer.train()`: settings that need torch, resume, the end of a run."""

import os
import warnings
from pathlib import Path

from .errors import ConfigError
from .threads import choose_threads, describe


def prepare_run(script_args, training_args):
    """Before the data and the model: the launch check, resume, threads, quiet output, the seed.

    Returns what to pass to `trainer.train(resume_from_checkpoint=...)`.
    """
    import torch
    from transformers import set_seed

    check_launch(training_args)
    resume = checkpoint_to_resume(training_args, script_args.overwrite_output_dir)
    threads = choose_threads(script_args.torch_threads)
    torch.set_num_threads(threads)
    rank_zero_print(describe(threads, script_args.torch_threads))
    if not has_accelerator():
        # pinned memory needs a device to copy to: torch would warn at every DataLoader (31 times a job)
        training_args.dataloader_pin_memory = False
        # what DeepSpeed finds on its own here, without its "Setting accelerator to CPU" warning
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    quiet_libraries()
    set_seed(training_args.seed)
    return resume


def has_accelerator():
    import torch

    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


def quiet_libraries():
    """No per-save progress bars ("Writing model shards", "Loading weights") and no repeated notices.

    The Trainer's own progress bars stay (they use tqdm directly, not the library switch).
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    # a LoRA adapter on a model named by a Hub id while its weights are local: peft's save looks the
    # base config up on the Hub; apply_lora(weights_path=...) answers locally, this catches the rest
    warnings.filterwarnings("once", message="Unable to fetch remote file")


def checkpoint_to_resume(training_args, overwrite_output_dir=False):
    """What to pass to `trainer.train(resume_from_checkpoint=...)`.

    `--resume_from_checkpoint true` (or `last`) resumes from the newest checkpoint in output_dir,
    a path resumes from that checkpoint. Without it, an output_dir that already holds checkpoints
    of another run is refused (rather than silently overwritten) unless `--overwrite_output_dir true`.
    """
    from transformers.trainer_utils import get_last_checkpoint

    out = training_args.output_dir
    last = get_last_checkpoint(out) if os.path.isdir(out) else None
    wanted = training_args.resume_from_checkpoint
    if wanted is None or str(wanted).lower() in ("false", "no", "none", ""):
        if last is not None and not overwrite_output_dir:
            raise ConfigError(f"output_dir {out} already holds checkpoints of an earlier run ({Path(last).name}). "
                              "Pass --resume_from_checkpoint true to continue it, --overwrite_output_dir true to "
                              "start over in the same folder, or another --output_dir.")
        return None
    if str(wanted).lower() in ("true", "yes", "last"):
        if last is None:
            raise ConfigError(f"--resume_from_checkpoint {wanted}: output_dir {out} holds no checkpoint-* folder.")
        return last
    if not os.path.isdir(wanted):
        raise ConfigError(f"--resume_from_checkpoint {wanted}: no such checkpoint folder.")
    return wanted


def check_launch(training_args):
    """Refuse a multi-process launch on a machine without GPU unless --use_cpu is set.

    Without `use_cpu`, processes started by torchrun / accelerate launch on a CPU-only machine do
    not join a process group: each trains its own copy on all the data, silently. With it, they form
    a gloo group (accelerate's MULTI_CPU) and train one model together.
    """
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not training_args.use_cpu and not torch.cuda.is_available():
        raise ConfigError(f"launched as {world} processes on a machine without a GPU: add --use_cpu true so they "
                          "train one model together over gloo (otherwise each process trains alone).")


def attach_sharpness(trainer, measures):
    """`--sam_measure ...`: add a SharpnessCallback that logs the measures after every evaluation.

    Measured on the first 4 batches of the trainer's validation set, with the callback's defaults
    (rho 0.05 for m-sharpness whatever the run's sam_rho, so runs compare). Returns the callback or None.
    """
    measures = getattr(measures, "sam_measure", measures)  # the parser, or the list it read
    if not measures:
        return None
    if trainer.eval_dataset is None or str(trainer.args.eval_strategy) in ("no", "IntervalStrategy.NO"):
        raise ConfigError("--sam_measure measures at every evaluation: it needs a validation set and "
                          "--eval_strategy steps or epoch.")
    from hf_sam.sharpness import SharpnessCallback

    return SharpnessCallback.attach(trainer, measures=measures)


def finish_run(trainer, metrics, *, tasks, dataset, finetuned_from=None):
    """Save the model (+ processor/tokenizer), metrics per split, trainer state and the model card; push if asked.

    metrics: {"train": {...}, "eval": {...}, "test": {...}}; tasks, dataset, finetuned_from go into the
    model card, which is named after the output folder.
    """
    card = dict(model_name=os.path.basename(os.path.normpath(trainer.args.output_dir)), tasks=tasks,
                dataset=dataset, finetuned_from=finetuned_from)
    for split, values in metrics.items():
        trainer.log_metrics(split, values)
        trainer.save_metrics(split, values)
    trainer.save_state()
    if trainer.args.push_to_hub:
        # saves the model, writes the card, uploads output_dir (checkpoint-* folders excluded). Not
        # save_model() first: with push_to_hub set, a user-called save_model() pushes on its own.
        trainer.push_to_hub(**card)
    else:
        trainer.save_model()
        trainer.create_model_card(**card)


def rank_zero_print(*args, **kwargs):
    """print() on the main process only (all processes run the script under torchrun / accelerate)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kwargs, flush=True)


def accuracy_metrics(metric_name):
    """`compute_metrics` for a classifier: argmax of the logits scored by an `evaluate` metric
    ('accuracy' loads hf_sam's bundled copy, offline)."""
    import numpy as np

    from hf_sam.metrics import load_metric

    metric = load_metric(metric_name)

    def compute_metrics(prediction):
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        return metric.compute(predictions=np.argmax(logits, axis=-1), references=prediction.label_ids)

    return compute_metrics


def train_and_finish(trainer, resume, command, measures, *, tasks, dataset, finetuned_from=None, test_split=None,
                     extra_eval=None):
    """Train (resuming if asked), evaluate (and test), save everything and the card. Returns the metrics.

    command: the reproduce command for the model card; measures: --sam_measure; extra_eval: a function
    that adds derived values to the eval metrics (perplexity).
    """
    trainer.sam_reproduce_command = command
    attach_sharpness(trainer, measures)  # --sam_measure: sharpness/* logged at every evaluation
    train_result = trainer.train(resume_from_checkpoint=resume)
    metrics = {"train": train_result.metrics, "eval": trainer.evaluate()}
    if extra_eval is not None:
        extra_eval(metrics["eval"])
    if test_split is not None:
        metrics["test"] = trainer.predict(test_split, metric_key_prefix="test").metrics
    finish_run(trainer, metrics, tasks=tasks, dataset=dataset, finetuned_from=finetuned_from)
    return metrics
