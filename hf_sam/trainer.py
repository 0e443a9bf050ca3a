"""SAMTrainer: `transformers.Trainer` with a sharpness-aware `training_step`.

Only `training_step` changes: it runs the configured variant on a StepContext (hf_sam.step), which
calls the stock `Trainer.training_step` for every pass. Clipping, the optimizer step, the LR
schedule, logging, evaluation and checkpoints stay the stock Trainer's.
"""

import os
from contextlib import nullcontext

import torch
from torch import nn
from transformers import Trainer
from transformers.training_args import OptimizerNames

from .config import SAMConfig, config_from_arguments
from .params import select_parameters
from . import sharded
from .scaling import layer_factors
from .step import Metrics, Selection, StepContext
from .variants import get_variant

SAM_STATE_FILE = "sam_state.pt"
_STEP_INSIDE_BACKWARD = {OptimizerNames.LOMO.value, OptimizerNames.ADALOMO.value}


class SAMTrainer(Trainer):
    """A drop-in `Trainer` that trains with SAM or one of its variants.

    Settings come from `sam_config` when given, else from the `sam_*` fields of
    `SAMTrainingArguments`, else the defaults (SAM, rho 0.05). Everything else is the Trainer's.
    """

    def __init__(self, *args, sam_config: SAMConfig | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if sam_config is not None and not isinstance(sam_config, SAMConfig):
            raise TypeError(f"sam_config must be a hf_sam.SAMConfig, got {type(sam_config).__name__}")
        self.sam_config = sam_config if sam_config is not None else config_from_arguments(self.args)
        self.sam_variant = get_variant(self.sam_config.variant)
        self.sam_state: dict = {}  # the variant's persistent state, saved with checkpoints
        self.sam_reproduce_command: str | None = None  # shown in the model card when set
        self._sam_selection = self._sam_selection_owner = None
        self._sam_metrics = None
        self._sam_last_passes = 1
        self._sam_loss_hook = None
        self._check_supported()
        self._check_selection()
        if self.sam_variant.on_setup is not None:
            self.sam_variant.on_setup(self)
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(self.sam_tags())

    # ---- set-up checks -----------------------------------------------------------------------
    def _check_supported(self):
        self.sam_config = sharded.setup(self)  # FSDP2 / refusals; resolves sync_ascent=None (auto)
        optim = str(getattr(self.args.optim, "value", self.args.optim))
        if optim in _STEP_INSIDE_BACKWARD or optim.endswith("_layerwise"):
            raise ValueError(f"optim={optim!r} updates the weights inside the backward pass, which leaves no point "
                             "at which SAM can perturb and restore them. Use an optimizer that steps after the "
                             "backward (e.g. adamw_torch, sgd, adafactor, galore without _layerwise).")
        pc = getattr(self.args, "parallelism_config", None)
        if pc is not None and (getattr(pc, "cp_size", 1) > 1 or getattr(pc, "sp_size", 1) > 1):
            raise ValueError("SAMTrainer does not support context or sequence parallelism (parallelism_config "
                             "cp_size/sp_size > 1) yet.")

    def _check_selection(self):
        """Run parameter selection and rho scaling once now, so bad settings fail before training."""
        if self.model is None:  # model_init: checked when the model is built, at the first step
            return
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError(f"{type(self.model).__name__} has no trainable parameter to perturb.")
        chosen = set(select_parameters(self.model, named, self.sam_config))
        layer_factors(self.model, [(n, p) for n, p in named if n in chosen], self.sam_config)

    # ---- the step ------------------------------------------------------------------------------
    def sam_active(self) -> bool:
        """Whether the current optimizer step is sharpness-aware (rho, interval, start/end gates)."""
        cfg, step = self.sam_config, self.state.global_step
        if self.sam_variant.uses_rho and cfg.rho == 0:
            return False
        if step % cfg.interval != 0:
            return False
        if (cfg.start > 0 or cfg.end < 1) and self.state.max_steps:
            fraction = step / self.state.max_steps
            if not cfg.start <= fraction < cfg.end:
                return False
        return True

    def training_step(self, model: nn.Module, inputs, num_items_in_batch=None):
        if not self.sam_active():
            self._sam_last_passes = 1
            return super().training_step(model, inputs, num_items_in_batch)
        ctx = StepContext(self, model, inputs, num_items_in_batch, self.sam_config, self._selection(),
                          self.sam_state, self._metrics())
        try:
            self.sam_variant.step(ctx)
            ctx.finish()
        finally:
            ctx.close()
            self._sam_last_passes = max(ctx.passes, 1)
        return ctx.loss()

    def _stock_training_step(self, model, inputs, num_items_in_batch, loss_hook=None):
        """One pass of the stock training_step: same loss path, GA/num_items scaling and backward.

        loss_hook(compute, model, inputs, num_items_in_batch) -> (loss, outputs), if given, wraps the
        loss computation of this pass; `compute(inputs)` runs the stock compute_loss and returns
        (loss, outputs). Variants use it for per-sample losses and extra loss terms.
        """
        self._sam_loss_hook = loss_hook
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        finally:
            self._sam_loss_hook = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        hook = getattr(self, "_sam_loss_hook", None)
        if hook is None:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

        def compute(batch):
            return super(SAMTrainer, self).compute_loss(model, batch, return_outputs=True,
                                                        num_items_in_batch=num_items_in_batch)

        loss, outputs = hook(compute, model, inputs, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    # ---- variant hooks around evaluation and saving (e.g. WASAM's averaged weights) -------------
    def _variant_hook(self, name):
        hook = self.sam_variant.hooks.get(name)
        return hook(self) if hook is not None else nullcontext()

    def evaluate(self, *args, **kwargs):
        with self._variant_hook("evaluate"):
            return super().evaluate(*args, **kwargs)

    def predict(self, *args, **kwargs):
        with self._variant_hook("evaluate"):
            return super().predict(*args, **kwargs)

    def save_model(self, *args, **kwargs):
        with self._variant_hook("save_model"):
            return super().save_model(*args, **kwargs)

    def _selection(self) -> Selection:
        opt = self.optimizer
        if self._sam_selection is not None and self._sam_selection_owner is opt:
            return self._sam_selection
        name_of = {id(p): n for n, p in self.model.named_parameters()}
        params, seen = [], set()
        for group in opt.param_groups:
            for p in group["params"]:
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        names = [name_of.get(id(p), f"<unnamed parameter {i}>") for i, p in enumerate(params)]
        named = list(zip(names, params))
        chosen = set(select_parameters(self.model, named, self.sam_config))
        selected = [n in chosen for n in names]
        s = q = None
        factors = layer_factors(self.model, [np for np, keep in zip(named, selected) if keep], self.sam_config)
        if factors is not None:
            it_s, it_q = iter(factors[0]), iter(factors[1])
            s = [float(next(it_s)) if keep else 1.0 for keep in selected]
            q = [float(next(it_q)) if keep else 1.0 for keep in selected]
        selection = Selection(params, names, selected, s, q)
        for m in self.model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None:
                selection.batchnorms += [m.running_mean, m.running_var, m.num_batches_tracked]
        self._sam_selection, self._sam_selection_owner = selection, opt
        return selection

    def sam_parameter_names(self) -> list[str]:
        """Names of the parameters the perturbation acts on (after `perturb` and the patterns)."""
        if self.optimizer is not None:
            sel = self._selection()
            return [n for n, keep in zip(sel.names, sel.selected) if keep]
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        return select_parameters(self.model, named, self.sam_config)

    def _metrics(self) -> Metrics:
        if self._sam_metrics is None:
            self._sam_metrics = Metrics(self.args.device)
        return self._sam_metrics

    def floating_point_ops(self, inputs) -> int:
        return super().floating_point_ops(inputs) * self._sam_last_passes

    # ---- logging -------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._sam_metrics is not None:
            logs.update(self._collect_metrics())
        super().log(logs, *args, **kwargs)

    def _collect_metrics(self) -> dict[str, float]:
        """Reduce the on-device sums across processes (one collective, one host sync, at log time only)."""
        m = self._sam_metrics
        vec = torch.stack([m.sums[k] for k in Metrics.KEYS])
        if self.accelerator.num_processes > 1:
            vec = self.accelerator.reduce(vec, reduction="sum")
        v = dict(zip(Metrics.KEYS, vec.tolist()))
        m.reset()
        out = {}
        if v["windows"] > 0:
            out["sam/sharpness"] = v["sharpness"] / v["windows"]
        if v["ascents"] > 0:
            out["sam/grad_norm"] = v["grad_norm"] / v["ascents"]
            out["sam/perturbation_norm"] = v["perturbation_norm"] / v["ascents"]
            out["sam/skipped"] = v["skipped"]
        return out

    # ---- checkpoints -----------------------------------------------------------------------------
    def _sam_state_path(self, folder) -> str:
        name = SAM_STATE_FILE
        if self.accelerator.num_processes > 1:  # per-device ascent => per-device state
            name = f"sam_state_rank{self.accelerator.process_index}.pt"
        return os.path.join(folder, name)

    def _save_optimizer_and_scheduler(self, output_dir):
        super()._save_optimizer_and_scheduler(output_dir)
        if self.sam_state:
            torch.save(sharded.state_to_save(self.sam_state), self._sam_state_path(output_dir))

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = self._sam_state_path(checkpoint)
        if os.path.isfile(path):
            self.sam_state.clear()
            device = self.args.device if self.args.device.type != "cpu" else "cpu"  # torch.load rejects "cpu:0"
            state = torch.load(path, map_location=device, weights_only=True)
            self.sam_state.update(sharded.state_loaded(self, state))

    # ---- model card ------------------------------------------------------------------------------
    def sam_tags(self) -> list[str]:
        tags = ["sam", "hf-sam", self.sam_config.variant]
        if self.sam_config.rho_scaling != "none":
            tags.append(self.sam_config.rho_scaling)
        return list(dict.fromkeys(tags))

    def create_model_card(self, language=None, license=None, tags=None, model_name=None, finetuned_from=None,
                          tasks=None, dataset_tags=None, dataset=None, dataset_args=None) -> None:
        """Write output_dir/README.md: the stock training summary plus how SAM was configured."""
        from .cards import write_model_card

        if not self.is_world_process_zero():
            return
        write_model_card(self, language=language, license=license, tags=tags, model_name=model_name,
                         finetuned_from=finetuned_from, tasks=tasks, dataset_tags=dataset_tags, dataset=dataset,
                         dataset_args=dataset_args)
