"""`--help` and the unknown-setting check, before torch and transformers are imported.

Importing transformers' TrainingArguments takes 10-25 s on a busy 2-core machine, and a script
needs it only to train. The names, defaults and help of the Trainer's and hf_sam's settings are
read here from the source files of the argument classes with `ast` (located with
`importlib.util.find_spec`, which runs none of their code), so `--help` and a misspelt key in a
config file answer in well under a second. Anything this reader cannot make sense of returns
None, and the script falls back to the full parser (slower, equally correct): the flag values
themselves (types, choices, validation) are always checked by the real parser.
"""

import argparse
import ast
import dataclasses
import difflib
import importlib.util
import os
import sys
import textwrap
from pathlib import Path

import yaml

from .errors import ConfigError

# Where the fields of a training-arguments class are written, most derived first:
# (top-level package, file inside it, class, prefix of the generated flags).
TRAINING_ARGUMENTS = [("hf_sam", "config.py", "SAMConfig", "sam_"),
                      ("transformers", "training_args.py", "TrainingArguments", "")]
SFT_CONFIG = [("hf_sam", "config.py", "SAMConfig", "sam_"),
              ("trl", "trainer/sft_config.py", "SFTConfig", ""),
              ("transformers", "training_args.py", "TrainingArguments", "")]

PARSER_OPTIONS = ("config", "sam_measure")  # added by ScriptParser itself


@dataclasses.dataclass
class Flag:
    name: str
    default: str  # as written in the source (or repr of the dataclass default)
    help: str
    group: str


def _text(node):
    """The value of a string literal node (implicit concatenation included), else its source."""
    try:
        value = ast.literal_eval(node)
    except (ValueError, SyntaxError, TypeError):
        return ast.unparse(node)
    return value if isinstance(value, str) else repr(value)


def _literal(node):
    try:
        return ast.literal_eval(node)
    except (ValueError, SyntaxError, TypeError):
        return None


def module_constants(tree):
    """NAME = <literal> assignments at the top of a module."""
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            value = _literal(node.value)
            if value is not None:
                out[node.targets[0].id] = value
    return out


def _module_tree(package, relative):
    """The parsed source of a file inside an installed package, without running it; None if unreadable."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    try:
        return ast.parse((Path(list(spec.submodule_search_locations)[0]) / relative).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return None


def sharpness_measures():
    """hf_sam.sharpness.MEASURES, read from the source ("top_eigenvalue, trace, m_sharpness" if unreadable)."""
    tree = _module_tree("hf_sam", "sharpness.py")
    measures = module_constants(tree).get("MEASURES") if tree is not None else None
    return list(measures) if isinstance(measures, (list, tuple)) else ["top_eigenvalue", "trace", "m_sharpness"]


def _source_flags(package, relative, class_name, prefix, group):
    """The fields of one dataclass, read from its source; None when it cannot be found or read."""
    tree = _module_tree(package, relative)
    if tree is None:
        return None
    cls = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name), None)
    if cls is None:
        return None
    constants = module_constants(tree)
    flags = []
    for node in cls.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        name = node.target.id
        if name.startswith("_") or "ClassVar" in ast.unparse(node.annotation):
            continue
        default, help_text = "None", ""
        value = node.value
        if isinstance(value, ast.Call) and getattr(value.func, "id", None) == "setting":  # hf_sam's SAMConfig
            default = ast.unparse(value.args[0]) if value.args else "None"
            help_node = value.args[1] if len(value.args) > 1 else next(
                (k.value for k in value.keywords if k.arg == "help"), None)
            help_text = _text(help_node) if help_node is not None else ""
            choices = next((k.value for k in value.keywords if k.arg == "choices"), None)
            if choices is not None:
                listed = constants.get(getattr(choices, "id", None)) or _literal(choices)
                if isinstance(listed, (list, tuple)):
                    help_text = f"{help_text} One of: {', '.join(map(str, listed))}."
        elif isinstance(value, ast.Call) and getattr(value.func, "id", None) == "field":
            keywords = {k.arg: k.value for k in value.keywords}
            if any(k in keywords for k in ("init",)) and ast.unparse(keywords["init"]) == "False":
                continue
            if "default" in keywords:
                default = ast.unparse(keywords["default"])
            elif "default_factory" in keywords:
                default = ast.unparse(keywords["default_factory"]) + "()"
            meta = keywords.get("metadata")
            if isinstance(meta, ast.Dict):
                for key, val in zip(meta.keys, meta.values):
                    if isinstance(key, ast.Constant) and key.value == "help":
                        help_text = _text(val)
        elif value is not None:
            default = ast.unparse(value)
        flags.append(Flag(prefix + name, default, " ".join(str(help_text).split()), group))
    return flags


def training_flags(sources):
    """Flags of a training-arguments class described by `sources` (see TRAINING_ARGUMENTS); None if unreadable."""
    out, seen = [], set()
    for package, relative, class_name, prefix in sources:
        group = "SAM settings (hf_sam)" if prefix == "sam_" else f"Trainer settings ({package}.{class_name})"
        flags = _source_flags(package, relative, class_name, prefix, group)
        if flags is None:
            return None
        for flag in flags:
            if flag.name not in seen:
                seen.add(flag.name)
                out.append(flag)
    return out


def dataclass_flags(cls, group):
    """Flags of a dataclass that is already imported (the script's own, LoRA)."""
    flags = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = repr(f.default_factory())
        else:
            default = "(required)"
        flags.append(Flag(f.name, default, " ".join(f.metadata.get("help", "").split()), group))
    return flags


def read_config(path):
    """The mapping in a YAML config file (without `env`); ConfigError naming the file otherwise."""
    return {k: v for k, v in load_config(path).items() if k != "env"}


def load_config(path):
    """The mapping in a YAML config file; ConfigError naming the file when it is missing or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (passed with --config).")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must be a mapping of `setting: value` lines, "
                          f"got a {type(values).__name__}.")
    return values


def unknown_setting(name, known, where):
    close = difflib.get_close_matches(str(name), sorted(known), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else " Run the script with --help for the list."
    return ConfigError(f"{where}: unknown setting {name!r}.{hint}")


def config_path(argv, default_config):
    """The --config value that applies (None for `--config none` or no default)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    path = known.config if known.config is not None else default_config
    return None if path is None or str(path).lower() == "none" else str(path)


def precheck(argv, own_classes, training_sources, default_config, description, prog):
    """Answer `--help`, and refuse unknown keys in the config file or on the command line, without heavy imports.

    own_classes: [(dataclass, group title)] of the script's own argument classes.
    Exits after printing the help; raises ConfigError for an unknown setting.
    """
    trainer = training_flags(training_sources)
    flags = [f for cls, title in own_classes for f in dataclass_flags(cls, title)] + (trainer or [])
    path = config_path(argv, default_config)
    if any(a in ("-h", "--help") for a in argv):
        values = {}
        if path is not None:
            try:
                values = read_config(path)
            except ConfigError as err:
                print(f"(config not read: {err})")
        print_help(flags, trainer is not None, values, path, description, prog)
        sys.exit(0)
    if trainer is None:  # the source could not be read: the full parser checks everything
        return
    known = {f.name for f in flags} | set(PARSER_OPTIONS)
    if path is not None:
        for key in read_config(path):
            if key not in known:
                raise unknown_setting(key, known, f"config file {path}")
    for arg in argv:
        if not arg.startswith("--") or arg == "--":
            continue
        name = arg[2:].split("=", 1)[0]
        bare = name[3:] if name.startswith("no_") else name
        if name in known or bare in known or any(k.startswith(name) for k in known):  # argparse takes prefixes
            continue
        raise unknown_setting(name, known, "command line")


def _format(flag, values, width, full):
    shown = f"--{flag.name}"
    default = f"default {flag.default}"
    if flag.name in values:
        default = f"config: {values[flag.name]!r}; {default}"
    help_text = flag.help if full else flag.help.split(". ")[0].rstrip(".")
    if not full and len(help_text) > 110:
        help_text = help_text[:107].rstrip() + "..."
    body = f"{help_text} ({default})" if help_text else f"({default})"
    return textwrap.fill(body, width=width, initial_indent=f"  {shown:<28} ", subsequent_indent=" " * 31)


def print_help(flags, complete, values, path, description, prog):
    width = min(110, max(80, os.get_terminal_size(sys.stdout.fileno()).columns if sys.stdout.isatty() else 100))
    lines = [f"usage: {prog} [--config FILE.yaml] [--setting VALUE ...]", ""]
    if description:
        lines += [description.strip(), ""]
    lines += ["Settings: the defaults below < the --config file (its values are marked `config:`) < flags on the",
              "command line. A key of the file is a flag without the dashes.", "",
              "options:",
              f"  {'--config FILE.yaml':<28} YAML file of settings; 'none' for the built-in defaults "
              f"(default {path})",
              f"  {'--sam_measure MEASURE ...':<28} After every evaluation, log sharpness/<measure> on 4 validation "
              f"batches: {', '.join(sharpness_measures())}"]
    group = None
    for flag in flags:
        if flag.group != group:
            group = flag.group
            short = group.startswith("Trainer")
            lines += ["", f"{group}{' (first sentence of each help)' if short else ''}:"]
        lines.append(_format(flag, values, width, full=not flag.group.startswith("Trainer")))
    if not complete:
        lines += ["", "(the Trainer's and hf_sam's settings could not be read from their source: see their docs)"]
    print("\n".join(lines))


def shown_path(path):
    """A path relative to the current folder when it is inside it (shorter commands and messages)."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def parse_script_args(script_file, description, own_classes, training, default_config, argv=None):
    """A training script's settings: dataclass defaults < --config file.yaml < command-line flags.

    own_classes: [(dataclass, group title)] of the script's argument classes (CommonArguments
    subclass first); training: (sources for the quick check, e.g. TRAINING_ARGUMENTS, and a function
    that imports and returns the training-arguments class). `--help` and unknown keys are answered
    before that import. Returns (*one instance per class, training arguments, reproduce command);
    the first instance also carries `sam_measure` (the parser's --sam_measure).
    """
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    sources, load_training_class = training
    default_config = shown_path(default_config) if default_config else None
    precheck(argv, own_classes, sources, default_config, description, os.path.basename(script_file))
    from .parser import ScriptParser, reproduce_command

    classes = [cls for cls, _ in own_classes]
    parser = ScriptParser((*classes, load_training_class()), description=description, default_config=default_config)
    parsed = parser.parse_args_and_config(argv)
    parsed[0].sam_measure = parser.sam_measure
    return (*parsed, reproduce_command(script_file, parser.effective_argv))


def _sam_training_arguments():
    from hf_sam import SAMTrainingArguments

    return SAMTrainingArguments


def _sam_sft_config():
    try:
        from trl import SFTConfig
    except ImportError as err:  # an optional extra
        raise SystemExit(f"scripts/train_sft.py needs TRL: pip install -e \".[trl]\" ({err})") from None
    from hf_sam import with_sam_args

    return with_sam_args(SFTConfig)  # SFTConfig + every SAM setting as --sam_<name>


SAM_TRAINING_ARGUMENTS = (TRAINING_ARGUMENTS, _sam_training_arguments)  # hf_sam.SAMTrainingArguments
SAM_SFT_CONFIG = (SFT_CONFIG, _sam_sft_config)  # hf_sam.with_sam_args(trl.SFTConfig)
