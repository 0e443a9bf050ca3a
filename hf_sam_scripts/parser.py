"""The scripts' parser: HfArgumentParser plus `--config file.yaml` (imports transformers).

`ScriptParser`: the file's keys become the parser's defaults and flags on the command line override
them (the pattern of TRL's scripts). A missing or malformed file, an unknown key or a value of the
wrong type is a `ConfigError` that names the file and the key, raised before anything is loaded or
trained. `cli.parse_script_args` builds it only after `cli.precheck` has answered `--help` and
caught unknown keys without transformers.
"""

import argparse
import os
import shlex
import sys
from pathlib import Path

from transformers import HfArgumentParser

from hf_sam.sharpness import MEASURES as SHARPNESS_MEASURES

from .cli import load_config, shown_path, unknown_setting
from .errors import ConfigError, ScriptError

REPO_DIR = Path(__file__).resolve().parent.parent


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
        self.default_config = shown_path(default_config) if default_config else None
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
        values = dict(load_config(path))
        if not values:  # an empty file sets nothing
            return {}
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
                raise unknown_setting(key, actions, f"config file {path}")
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


def reproduce_command(script_file, argv=None):
    """The shell command that reruns this script with the same arguments (for the model card)."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    script = Path(script_file).resolve()
    try:
        shown = script.relative_to(REPO_DIR)
    except ValueError:
        shown = script
    return shlex.join(["python", str(shown), *argv])
