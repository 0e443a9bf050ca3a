"""SAMMixin / with_sam: the Trainer front-end of the step engine (hf_sam.step).

`with_sam(TrainerClass)` makes any `transformers.Trainer` subclass sharpness-aware: TRL's
`SFTTrainer` and `DPOTrainer`, `Seq2SeqTrainer`, your own subclass. `SAMTrainer` is
`with_sam(Trainer)`. The mixin belongs before the host in the MRO (`with_sam(Host)`,
`class X(SAMMixin, Host)` or `class X(SAMTrainer, Host)`); `class X(Host, SAMTrainer)` also takes
`sam_config=`, but host methods that do not call super() (TRL's compute_loss) then hide the mixin's,
and a variant whose loss hook is bypassed that way stops with an error. Each pass of a
sharpness-aware step is one call of the host class's own `training_step` (its `compute_loss`,
GA / num_items scaling, `accelerator.backward`); clipping, the optimizer step, the LR schedule,
logging, evaluation and checkpoints stay the host's. The host's `_prepare_inputs` runs once per
micro-batch: every later pass of that micro-batch gets the batch the first pass prepared (a shallow
copy of it), so hosts that draw or generate their training batch there (TRL's GRPO and RLOO,
which generate completions and score them with the reward functions) do so once, as stock.

The mixin overrides these Trainer methods: `training_step`, `_prepare_inputs` (only within a
sharpness-aware step), `compute_loss` (only while a variant's loss hook is active), `train`,
`_hp_search_setup`, `evaluate`, `predict`, `save_model`, `floating_point_ops`, `log`,
`_save_optimizer_and_scheduler`, `_load_optimizer_and_scheduler` and `create_model_card`. Its
state lives in one object, `trainer._sam` (a `SAMRun`); its own methods and properties start with
`sam_` (public) or `_sam_` (private), so they cannot collide with a host class's names.
"""

import collections.abc
import copy
import dataclasses
import functools
import os
from collections import deque
from contextlib import nullcontext

import torch
from torch import nn
from transformers import Trainer
from transformers.training_args import OptimizerNames

from . import sharded
from .config import (PREFIX, SAMConfig, check_host_arguments, config_from_arguments, protect_secrets,
                     publish_generated_class, sam_arguments_changed)
from .params import select_parameters
from .scaling import layer_factors
from .step import Metrics, StepContext, build_selection, run_step, sam_active, unique_trainable
from .variants import get_variant


SAM_STATE_FILE = "sam_state.pt"
_STEP_INSIDE_BACKWARD = {OptimizerNames.LOMO.value, OptimizerNames.ADALOMO.value}

# Trainer attributes that are never per-pass bookkeeping (large, or owned by the loop).
_NOT_BOOKKEEPING = {"args", "model", "model_wrapped", "train_dataset", "eval_dataset", "processing_class",
                    "data_collator", "optimizer", "lr_scheduler", "accelerator", "state", "control",
                    "callback_handler", "hp_space", "model_init", "compute_metrics", "compute_loss_func",
                    "current_gradient_accumulation_steps", "current_flos", "is_in_train", "_trial"}
_MAX_BOOKKEEPING_LEAVES = 20000


@dataclasses.dataclass
class SAMRun:
    """Everything a sharpness-aware trainer keeps, in one attribute (`trainer._sam`).

    explicit_config: the `sam_config=` given to the constructor (None: read the `sam_*` arguments);
    config / variant: what the current run uses (a hyperparameter-search trial may override);
    state: the variant's persistent state (saved with checkpoints as sam_state.pt);
    metrics: on-device sums since the last log; selection: cached per optimizer;
    flags: once-per-run warnings given; last_passes: passes of the latest micro-batch (FLOPs);
    sharding: the sharding strategy handed to every step context (hf_sam.step.Replicated for one
    process or DDP, hf_sam.sharded's FSDP2 / DeepSpeed), chosen when the settings are applied.
    front: the TrainerFrontEnd of the micro-batch being stepped (None between steps).
    """

    explicit_config: SAMConfig | None
    config: SAMConfig
    variant: object
    state: dict = dataclasses.field(default_factory=dict)
    metrics: Metrics | None = None
    selection: object = None
    selection_owner: object = None
    loss_hook: object = None
    loss_hook_used: bool = False
    last_passes: int = 1
    flags: set = dataclasses.field(default_factory=set)
    set_up_variant: str | None = None
    reproduce_command: str | None = None
    sharding: object = None
    front: object = None

    def fresh(self):
        """Forget what belongs to one training run (a new train() call or trial starts clean)."""
        self.state.clear()
        self.metrics = None
        self.selection = self.selection_owner = None
        self.flags.clear()
        self.last_passes = 1


# ---- temporary passes leave no trace in the host trainer's bookkeeping ------------------------------
def _plain(value, budget):
    """Leaves of `value` if it is plain data (numbers, strings, small tensors, containers of them), else None."""
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return 1
    if torch.is_tensor(value):
        return 1 if value.numel() <= 4096 else None
    if isinstance(value, (list, tuple, deque, set)):
        items = value
    elif isinstance(value, dict):
        items = value.values()
    else:
        return None
    total = 1
    for item in items:
        n = _plain(item, budget - total)
        if n is None:
            return None
        total += n
        if total > budget:
            return None
    return total


def bookkeeping_snapshot(host) -> dict:
    """Copies of the host trainer's plain-data attributes (metric lists, token counters, ...)."""
    snap = {}
    for name, value in vars(host).items():
        if name.startswith("_sam") or name in _NOT_BOOKKEEPING:
            continue
        if _plain(value, _MAX_BOOKKEEPING_LEAVES) is not None:
            snap[name] = copy.deepcopy(value)
    return snap


def _restore_into(current, saved):
    """Make `current` equal `saved`, in place for mutable containers (others may hold a reference)."""
    if isinstance(current, dict) and isinstance(saved, dict):
        for key in list(current):
            if key not in saved:
                del current[key]
        for key, value in saved.items():
            if key in current and isinstance(current[key], (dict, list)):
                current[key] = _restore_into(current[key], value)
            else:
                current[key] = value
        return current
    if isinstance(current, list) and isinstance(saved, list):
        current[:] = saved
        return current
    return saved


def bookkeeping_restore(host, snap: dict) -> None:
    for name, value in snap.items():
        if name in vars(host):
            setattr(host, name, _restore_into(vars(host)[name], value))
    for name in [n for n in vars(host) if n not in snap and not n.startswith("_sam") and n not in _NOT_BOOKKEEPING]:
        if _plain(vars(host)[name], _MAX_BOOKKEEPING_LEAVES) is not None:
            delattr(host, name)  # created by the pass that is being undone


class TrainerFrontEnd:
    """The step engine's pass runner inside a Trainer: one pass = the host's own training_step."""

    def __init__(self, trainer, model, inputs, num_items_in_batch, stock_step):
        self.trainer = trainer
        self.model = model
        self.inputs = inputs
        self.num_items_in_batch = num_items_in_batch
        self._stock_step = stock_step
        acc = trainer.accelerator
        self.optimizer = trainer.optimizer
        self.global_step = trainer.state.global_step
        self.max_steps = trainer.state.max_steps
        self.epoch = trainer.state.epoch
        self.seed = trainer.args.seed
        self.process_index = acc.process_index
        self.num_processes = acc.num_processes
        self.sync_gradients = acc.sync_gradients
        self.accumulation_steps = getattr(trainer, "current_gradient_accumulation_steps", 1)
        self.scaler = getattr(acc, "scaler", None)
        self.flags = trainer._sam.flags
        self.prepared = None  # (the host's _prepare_inputs(inputs),) once the first pass has prepared it

    def prepare(self, prepare_inputs, inputs):
        """The host's `_prepare_inputs` for this micro-batch's `inputs`: run once, shared by every pass.

        Each pass gets a shallow copy of a prepared mapping, so a pass that pops keys (label smoothing)
        leaves the next pass the full batch.
        """
        if self.prepared is None:
            self.prepared = (prepare_inputs(inputs),)
        batch = self.prepared[0]
        return copy.copy(batch) if isinstance(batch, collections.abc.Mapping) else batch

    def no_sync(self):
        return self.trainer.accelerator.no_sync(self.model)

    def run(self, loss_hook=None, keep=True):
        run = self.trainer._sam
        snap = None if keep else bookkeeping_snapshot(self.trainer)
        run.loss_hook, run.loss_hook_used = loss_hook, False
        try:
            loss = self._stock_step(self.model, self.inputs, self.num_items_in_batch)
            if loss_hook is not None and not run.loss_hook_used:
                raise ValueError(
                    f"{self.trainer.sam_config.variant} changes the loss, but {type(self.trainer).__name__}'s "
                    "compute_loss did not reach SAMMixin.compute_loss (a class before SAMMixin in the MRO computes "
                    "the loss without calling super().compute_loss). Put SAMMixin first: with_sam(HostTrainer) or "
                    "class MyTrainer(SAMMixin, HostTrainer).")
            return loss
        finally:
            run.loss_hook = None
            if snap is not None:
                bookkeeping_restore(self.trainer, snap)


class SAMMixin:
    """Makes a `transformers.Trainer` subclass sharpness-aware. Use `with_sam(TrainerClass)`.

    Settings come from `sam_config` when given, else from the `sam_*` fields of the arguments
    (`with_sam_args(ArgsClass)`), else the defaults (SAM, rho 0.05). Giving both `sam_config` and
    non-default `sam_*` arguments is an error.
    """

    def __init_subclass__(cls, **kwargs):
        """A class that puts a host trainer before SAMMixin (`class X(Seq2SeqTrainer, SAMTrainer)`) still takes
        `sam_config=`: the host's __init__ does not know it, so X.__init__ takes it off and SAMMixin reads it."""
        super().__init_subclass__(**kwargs)
        mro = cls.__mro__
        hosts_first = [c for c in mro[1:mro.index(SAMMixin)] if issubclass(c, Trainer) and not issubclass(c, SAMMixin)]
        if not hosts_first:
            return
        host_init = cls.__init__

        @functools.wraps(host_init)
        def __init__(self, *args, **kw):
            if "sam_config" in kw:
                self.__dict__["_sam_pending_config"] = kw.pop("sam_config")
            check_host_arguments(type(self), args, kw)
            host_init(self, *args, **kw)

        cls.__init__ = __init__

    def __init__(self, *args, sam_config: SAMConfig | None = None, **kwargs):
        check_host_arguments(type(self), args, kwargs)  # sam_* arguments of the class the host expects
        super().__init__(*args, **kwargs)
        protect_secrets(self.args)  # hub_token: used for the push, never pickled into training_args.bin
        pending = self.__dict__.pop("_sam_pending_config", None)
        if sam_config is None:
            sam_config = pending
        if sam_config is not None and not isinstance(sam_config, SAMConfig):
            raise TypeError(f"sam_config must be a hf_sam.SAMConfig, got {type(sam_config).__name__}")
        if sam_config is not None:
            changed = sam_arguments_changed(self.args)
            if changed:
                names = ", ".join(f"{PREFIX}{k}={v!r}" for k, v in changed.items())
                raise ValueError(f"SAM settings given twice: sam_config=SAMConfig(...) and the arguments' {names}. "
                                 "Pass the settings one way: either in sam_config or as sam_* arguments.")
        config = sam_config if sam_config is not None else config_from_arguments(self.args)
        self._sam = SAMRun(explicit_config=sam_config, config=config, variant=get_variant(config.variant))
        self._sam_check_supported()
        self._sam_configure(config)
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(self.sam_tags())

    # ---- public state ------------------------------------------------------------------------
    @property
    def sam_config(self) -> SAMConfig:
        return self._sam.config

    @property
    def sam_variant(self):
        return self._sam.variant

    @property
    def sam_sharding(self):
        """How this run is sharded: the strategy its steps use (`.kind`: None, "fsdp2" or "deepspeed")."""
        return self._sam.sharding

    @property
    def sam_state(self) -> dict:
        """The variant's persistent state (saved with checkpoints)."""
        return self._sam.state

    @property
    def sam_reproduce_command(self) -> str | None:
        """The command shown in the model card (set by the training scripts)."""
        return self._sam.reproduce_command

    @sam_reproduce_command.setter
    def sam_reproduce_command(self, value):
        self._sam.reproduce_command = value

    # ---- set-up ------------------------------------------------------------------------------
    def _sam_configure(self, config: SAMConfig) -> None:
        """Use `config` from now on: variant, early selection check, the variant's own set-up."""
        run = self._sam
        # FSDP2/DeepSpeed: variants checked; sync_ascent=None (auto) resolved
        run.sharding, config = sharded.configure(self, config, previous=run.sharding)
        run.config, run.variant = config, get_variant(config.variant)
        run.selection = run.selection_owner = None
        self._sam_check_selection()
        if run.variant.on_setup is not None and run.set_up_variant != run.variant.name:
            run.variant.on_setup(self)
            run.set_up_variant = run.variant.name

    def _sam_check_supported(self):
        sharded.check(self)  # DeepSpeed, FSDP1, FSDP/DeepSpeed asked for but not set up (CPU)
        optim = str(getattr(self.args.optim, "value", self.args.optim))
        if optim in _STEP_INSIDE_BACKWARD or optim.endswith("_layerwise"):
            raise ValueError(f"optim={optim!r} updates the weights inside the backward pass, which leaves no point "
                             "at which SAM can perturb and restore them. Use an optimizer that steps after the "
                             "backward (e.g. adamw_torch, sgd, adafactor, galore without _layerwise).")
        pc = getattr(self.args, "parallelism_config", None)
        if pc is not None and (getattr(pc, "cp_size", 1) > 1 or getattr(pc, "sp_size", 1) > 1):
            raise ValueError("hf_sam does not support context or sequence parallelism (parallelism_config "
                             "cp_size/sp_size > 1) yet.")

    def _sam_check_selection(self):
        """Run parameter selection and rho scaling once now, so bad settings fail before training."""
        if self.model is None:  # model_init: checked when the model is built, at the first step
            return
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError(f"{type(self.model).__name__} has no trainable parameter to perturb.")
        chosen = set(select_parameters(self.model, named, self.sam_config))
        layer_factors(self.model, [(n, p) for n, p in named if n in chosen], self.sam_config)

    # ---- runs and trials: every train() starts with fresh variant state ------------------------
    def train(self, resume_from_checkpoint=None, trial=None, **kwargs):
        run = self._sam
        run.fresh()
        base = run.explicit_config if run.explicit_config is not None else config_from_arguments(self.args)
        if base != run.config:
            self._sam_configure(base)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)

    def _hp_search_setup(self, trial):
        """Apply a trial's `sam_*` keys to this trial's SAM settings (the others go to the arguments)."""
        sam_params = {}
        if self.hp_search_backend is not None and trial is not None:
            params = self.hp_space(trial) if not isinstance(trial, dict) else dict(trial)
            sam_params = {k: v for k, v in params.items() if k.startswith(PREFIX)}
            if sam_params and not isinstance(trial, dict):
                space = self.hp_space
                self.hp_space = lambda t: {k: v for k, v in space(t).items() if not k.startswith(PREFIX)}
                try:
                    super()._hp_search_setup(trial)
                finally:
                    self.hp_space = space
            else:
                super()._hp_search_setup({k: v for k, v in trial.items() if not k.startswith(PREFIX)}
                                         if isinstance(trial, dict) else trial)
        else:
            super()._hp_search_setup(trial)
        if sam_params:
            fields = {f.name for f in dataclasses.fields(SAMConfig)}
            unknown = [k for k in sam_params if k[len(PREFIX):] not in fields]
            if unknown:
                raise ValueError(f"hyperparameter search space: {', '.join(unknown)} is not a SAM setting; "
                                 f"SAM settings are {PREFIX}<name> with <name> one of {', '.join(sorted(fields))}.")
            base = self._sam.explicit_config if self._sam.explicit_config is not None else \
                config_from_arguments(self.args)
            overrides = {k[len(PREFIX):]: v for k, v in sam_params.items()}
            for key, value in overrides.items():
                if hasattr(self.args, PREFIX + key):
                    setattr(self.args, PREFIX + key, value)
            self._sam_configure(base.replace(**overrides))
        self._sam.fresh()

    # ---- the step ------------------------------------------------------------------------------
    def sam_active(self) -> bool:
        """Whether the current optimizer step is sharpness-aware (rho, interval, start/end gates)."""
        return sam_active(self.sam_config, self.sam_variant, self.state.global_step, self.state.max_steps)

    def training_step(self, model: nn.Module, inputs, num_items_in_batch=None, *args, **kwargs):
        if not self.sam_active():
            self._sam.last_passes = 1
            return super().training_step(model, inputs, num_items_in_batch, *args, **kwargs)

        def stock_step(m, batch, n):
            return self._sam_run_pass(m, batch, n, *args, **kwargs)

        front = TrainerFrontEnd(self, model, inputs, num_items_in_batch, stock_step)
        ctx = StepContext(front, self.sam_config, self._sam_selection(), self._sam.state, self._sam_metrics(),
                          sharding=self._sam.sharding)
        self._sam.front = front
        try:
            return run_step(self.sam_variant, ctx)
        finally:
            self._sam.front = None
            self._sam.last_passes = max(ctx.passes, 1)

    def _prepare_inputs(self, inputs):
        front = getattr(getattr(self, "_sam", None), "front", None)
        if front is None or inputs is not front.inputs:  # not this step's micro-batch: the host's own
            return super()._prepare_inputs(inputs)
        return front.prepare(super()._prepare_inputs, inputs)

    def _sam_run_pass(self, model, inputs, num_items_in_batch=None, *args, **kwargs):
        """One pass of a sharpness-aware step: the host class's own training_step (loss, scaling, backward)."""
        return super().training_step(model, inputs, num_items_in_batch, *args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
        hook = self._sam.loss_hook
        if hook is None:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch, **kwargs)

        def compute(batch):
            return super(SAMMixin, self).compute_loss(model, batch, return_outputs=True,
                                                      num_items_in_batch=num_items_in_batch, **kwargs)

        self._sam.loss_hook_used = True
        loss, outputs = hook(compute, model, inputs, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    # ---- variant hooks around evaluation and saving (e.g. WASAM's averaged weights) -------------
    def _sam_variant_hook(self, name):
        hook = self.sam_variant.hooks.get(name)
        return hook(self) if hook is not None else nullcontext()

    def evaluate(self, *args, **kwargs):
        with self._sam_variant_hook("evaluate"):
            return super().evaluate(*args, **kwargs)

    def predict(self, *args, **kwargs):
        with self._sam_variant_hook("evaluate"):
            return super().predict(*args, **kwargs)

    def save_model(self, *args, **kwargs):
        with self._sam_variant_hook("save_model"):
            return super().save_model(*args, **kwargs)

    def _sam_selection(self):
        run, opt = self._sam, self.optimizer
        if run.selection is None or run.selection_owner is not opt:
            params = run.sharding.trainable(self.model) or unique_trainable(opt.param_groups)  # DeepSpeed: the module's
            run.selection = build_selection(self.model, params, self.sam_config)
            run.selection_owner = opt
        return run.selection

    def sam_parameter_names(self) -> list[str]:
        """Names of the parameters the perturbation acts on (after `perturb` and the patterns)."""
        if self.optimizer is not None:
            return self._sam_selection().selected_names
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        return select_parameters(self.model, named, self.sam_config)

    def _sam_metrics(self) -> Metrics:
        if self._sam.metrics is None:
            self._sam.metrics = Metrics(self.args.device)
        return self._sam.metrics

    def floating_point_ops(self, inputs) -> int:
        return super().floating_point_ops(inputs) * self._sam.last_passes

    # ---- logging -------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._sam.metrics is not None:
            logs.update(self._sam_collect_metrics())
        super().log(logs, *args, **kwargs)

    def _sam_collect_metrics(self) -> dict[str, float]:
        """Reduce the on-device sums across processes (one collective, one host sync, at log time only)."""
        m = self._sam.metrics
        vec = m.vector()
        if self.accelerator.num_processes > 1:
            vec = self.accelerator.reduce(vec, reduction="sum")
        totals = dict(zip(Metrics.KEYS, vec.tolist()))
        m.reset()
        return m.means(totals)

    # ---- checkpoints -----------------------------------------------------------------------------
    def _sam_state_path(self, folder) -> str:
        name = SAM_STATE_FILE
        if self.accelerator.num_processes > 1:  # per-device ascent => per-device state
            name = f"sam_state_rank{self.accelerator.process_index}.pt"
        return os.path.join(folder, name)

    def _save_optimizer_and_scheduler(self, output_dir):
        super()._save_optimizer_and_scheduler(output_dir)
        if self.sam_state:
            torch.save(self._sam.sharding.state_to_save(self.sam_state), self._sam_state_path(output_dir))

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = self._sam_state_path(checkpoint)
        if os.path.isfile(path):
            self.sam_state.clear()
            device = self.args.device if self.args.device.type != "cpu" else "cpu"  # torch.load rejects "cpu:0"
            state = torch.load(path, map_location=device, weights_only=True)
            self.sam_state.update(self._sam.sharding.state_loaded(state, self.optimizer))

    # ---- model card ------------------------------------------------------------------------------
    def sam_tags(self) -> list[str]:
        tags = ["sam", "hf-sam", self.sam_config.variant]
        if self.sam_config.rho_scaling != "none":
            tags.append(self.sam_config.rho_scaling)
        return list(dict.fromkeys(tags))

    def create_model_card(self, language=None, license=None, tags=None, model_name=None, finetuned_from=None,
                          tasks=None, dataset_tags=None, dataset=None, dataset_args=None, **kwargs) -> None:
        """Write output_dir/README.md: the stock training summary plus how SAM was configured."""
        from .cards import write_model_card

        if not self.is_world_process_zero():
            return
        write_model_card(self, language=language, license=license, tags=tags, model_name=model_name,
                         finetuned_from=finetuned_from, tasks=tasks, dataset_tags=dataset_tags, dataset=dataset,
                         dataset_args=dataset_args)


_WITH_SAM: dict[type, type] = {}


def with_sam(trainer_class: type) -> type:
    """`trainer_class` made sharpness-aware: `class SAM<Name>(SAMMixin, trainer_class)` (cached).

    Works for `Trainer` and any subclass (TRL's SFTTrainer/DPOTrainer, Seq2SeqTrainer, your own).
    The new class takes `sam_config=` besides the host's own arguments.
    """
    if not (isinstance(trainer_class, type) and issubclass(trainer_class, Trainer)):
        raise TypeError(f"with_sam expects a transformers.Trainer subclass, got {trainer_class!r}")
    if issubclass(trainer_class, SAMMixin):
        return trainer_class
    if trainer_class not in _WITH_SAM:
        name = "SAMTrainer" if trainer_class is Trainer else f"SAM{trainer_class.__name__}"
        cls = type(name, (SAMMixin, trainer_class), {"__doc__": f"{trainer_class.__name__} with SAM "
                                                                 "(see hf_sam.SAMMixin)."})
        publish_generated_class(cls, globals())
        _WITH_SAM[trainer_class] = cls
    return _WITH_SAM[trainer_class]


SAMTrainer = with_sam(Trainer)
SAMTrainer.__doc__ = """A drop-in `transformers.Trainer` that trains with SAM or one of its variants.

    Settings come from `sam_config` when given, else from the `sam_*` fields of
    `SAMTrainingArguments`, else the defaults (SAM, rho 0.05). Everything else is the Trainer's.
    """
