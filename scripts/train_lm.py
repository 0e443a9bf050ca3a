"""Causal language modelling with a GPT-2-family model, trained by hf_sam's SAMTrainer.

Its default job (configs/gpt_pydoc.yaml, read when no --config is given) pretrains a small GPT-2
(4 layers, width 128, 128-token context) from scratch with SAM on the text of CPython's own help
topics (`pydoc_data.topics`, which ships with Python), after training a byte-level BPE tokenizer
(1024 tokens) on the training documents. It reports the perplexity on held-out documents. No
network needed.

    python scripts/train_lm.py                                      # = --config configs/gpt_pydoc.yaml
    python scripts/train_lm.py --config configs/gpt_pydoc.yaml --n_embd 256 --n_head 8 --output_dir runs/w256
    python scripts/train_lm.py --config configs/gpt_pydoc.yaml --sam_rho 0 --output_dir runs/gpt_no_sam
    python scripts/train_lm.py --train_file corpus.txt --output_dir runs/my_corpus
    python scripts/train_lm.py --config configs/hub/gpt2_wikitext.yaml      # needs network and a GPU

Width sweeps change --n_embd (and --n_head); every `SAMTrainingArguments` flag works (--sam_rho,
--sam_rho_scaling mupp, ...); LoRA through --lora_r 8 when starting from a pretrained model.
"""

import math
import os
import sys
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # for _common when run as a script

import torch
from transformers import default_data_collator, set_seed

from _common import (
    ConfigError,
    DataError,
    LoraArguments,
    ScriptParser,
    apply_lora,
    attach_sharpness,
    check_launch,
    checkpoint_to_resume,
    finetuned_from,
    finish_run,
    rank_zero_print,
    reproduce_command,
    train_bpe,
    require_columns,
    resolve_model_path,
    run_main,
    split_train_validation_test,
    take,
)

from hf_sam import SAMTrainer, SAMTrainingArguments

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "gpt_pydoc.yaml")
END_OF_TEXT = "<|endoftext|>"


@dataclass
class ScriptArguments:
    # --- model: a pretrained causal LM, or (default) a GPT-2 built from these sizes ---
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "Pretrained causal LM: a Hub id (gpt2), a local folder, or package:<module>/<folder>. "
                "Default: a GPT-2 built from n_embd / n_layer / n_head."})
    n_embd: int = field(default=128, metadata={"help": "Built GPT-2: width (embedding size)."})
    n_layer: int = field(default=4, metadata={"help": "Built GPT-2: number of transformer blocks."})
    n_head: int = field(default=4, metadata={"help": "Built GPT-2: attention heads per block."})
    dropout: float = field(default=0.1, metadata={"help": "Built GPT-2: dropout on embeddings, residuals, attention."})
    block_size: int = field(default=128, metadata={"help": "Tokens per training example (context length)."})
    # --- tokenizer: from the Hub / a folder, or (default) trained on the training documents ---
    tokenizer_name: str | None = field(default=None, metadata={
        "help": "Tokenizer: a Hub id or local folder. Default: the model's, or for a built model a byte-level "
                "BPE tokenizer trained on the training split."})
    vocab_size: int = field(default=1024, metadata={"help": "Size of the trained BPE vocabulary."})
    # --- data: a Hub dataset, local files, or (default) CPython's pydoc topics ---
    dataset_name: str | None = field(default=None, metadata={
        "help": "Hub dataset id (e.g. wikitext). Default: the text of pydoc_data.topics (ships with Python)."})
    dataset_config_name: str | None = field(default=None, metadata={
        "help": "Hub dataset configuration (e.g. wikitext-103-raw-v1)."})
    train_file: str | None = field(default=None, metadata={
        "help": "Local training text: .txt (one example per paragraph), .json/.jsonl or .csv with a text column."})
    validation_file: str | None = field(default=None, metadata={"help": "Local held-out text, same format."})
    text_column: str = field(default="text", metadata={"help": "Column holding the text."})
    validation_fraction: float = field(default=0.1, metadata={
        "help": "Share of the training documents held out when there is no validation split."})
    split_seed: int = field(default=42, metadata={"help": "Seed of the train/validation split."})
    preprocessing_num_workers: int | None = field(default=None, metadata={
        "help": "Processes for tokenizing and grouping (datasets.map num_proc); default: one."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep the first N training blocks."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep the first N held-out blocks."})
    # --- output ---
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
    if script_args.model_name_or_path is None and script_args.n_embd % script_args.n_head:
        raise ConfigError(f"n_embd={script_args.n_embd} must be a multiple of n_head={script_args.n_head}.")
    check_launch(training_args)
    resume = checkpoint_to_resume(training_args, script_args.overwrite_output_dir)
    # Evaluation needs only the loss (perplexity = exp(loss)); keeping every logit of a 50k-token
    # vocabulary for the whole held-out set would take gigabytes.
    training_args.prediction_loss_only = True
    if script_args.torch_threads:
        torch.set_num_threads(script_args.torch_threads)
    set_seed(training_args.seed)

    # -------------------------------------------------------------------------
    # 2. Documents: train and validation splits of a text column. Held-out documents are whole
    #    documents, so no training block shares text with the held-out ones.
    splits, source = load_text_data(script_args)
    for name in splits:
        require_columns(splits[name], [(script_args.text_column, "text_column")], f"{source} ({name} split)")
    splits = split_train_validation_test(splits, script_args.validation_fraction, 0.0,
                                         seed=script_args.split_seed, need_test=False)
    rank_zero_print(f"data: {source}: " + ", ".join(f"{name} {len(ds)} documents" for name, ds in splits.items()))

    # -------------------------------------------------------------------------
    # 3. Tokenizer: the model's / a named one, or a byte-level BPE trained on the training split.
    tokenizer = build_tokenizer(script_args, splits["train"])

    # -------------------------------------------------------------------------
    # 4. Tokenize every document (+ end-of-text), concatenate, and cut into blocks of block_size.
    #    The labels are the inputs: the model shifts them by one position inside its loss.
    block_size, text_column = script_args.block_size, script_args.text_column
    eos = tokenizer.eos_token_id

    def tokenize(batch):
        ids = tokenizer(batch[text_column], add_special_tokens=False, verbose=False)["input_ids"]
        return {"input_ids": [x + [eos] for x in ids]}

    def group_into_blocks(batch):
        stream = [token for ids in batch["input_ids"] for token in ids]
        usable = len(stream) // block_size * block_size  # the remainder of each batch of documents is dropped
        blocks = [stream[i:i + block_size] for i in range(0, usable, block_size)]
        return {"input_ids": blocks, "labels": [list(b) for b in blocks]}

    workers = script_args.preprocessing_num_workers
    tokenized = splits.map(tokenize, batched=True, remove_columns=splits["train"].column_names, num_proc=workers,
                           desc="Tokenizing")
    lm_data = tokenized.map(group_into_blocks, batched=True, batch_size=1000, num_proc=workers,
                            desc=f"Grouping into blocks of {block_size} tokens")
    train_data = take(lm_data["train"], script_args.max_train_samples)
    eval_data = take(lm_data["validation"], script_args.max_eval_samples)
    for name, ds in (("train", train_data), ("validation", eval_data)):
        if len(ds) == 0:
            raise DataError(f"{source}: the {name} split has fewer than block_size={block_size} tokens; lower "
                            "--block_size or give it more text (--validation_fraction for the held-out part).")
    rank_zero_print(f"blocks of {block_size} tokens: train {len(train_data)}, validation {len(eval_data)}")

    # -------------------------------------------------------------------------
    # 5. Model: pretrained or a GPT-2 built from the sizes; LoRA when asked.
    model = build_model(script_args, tokenizer)
    model = apply_lora(model, lora_args, task_type="CAUSAL_LM", default_targets=[["c_attn"], ["q_proj", "v_proj"]])

    # -------------------------------------------------------------------------
    # 6. Train with SAM. Checkpoints (model, tokenizer, optimizer, SAM state) go to output_dir.
    trainer = SAMTrainer(
        model=model,
        args=training_args,
        train_dataset=train_data,
        eval_dataset=eval_data,
        data_collator=default_data_collator,
        processing_class=tokenizer,
    )
    trainer.sam_reproduce_command = reproduce_command(__file__, parser.effective_argv)
    attach_sharpness(trainer, parser)  # --sam_measure: sharpness/* logged at every evaluation
    train_result = trainer.train(resume_from_checkpoint=resume)

    # -------------------------------------------------------------------------
    # 7. Held-out perplexity, then save model + tokenizer + metrics + model card; push if asked.
    eval_metrics = trainer.evaluate()
    eval_metrics["eval_perplexity"] = math.exp(min(eval_metrics["eval_loss"], 700.0))
    metrics = {"train": train_result.metrics, "eval": eval_metrics}
    finish_run(trainer, metrics, tasks="text-generation", dataset=source,
               finetuned_from=finetuned_from(script_args.model_name_or_path))
    rank_zero_print(f"held-out perplexity: {eval_metrics['eval_perplexity']:.2f} "
                    f"(loss {eval_metrics['eval_loss']:.4f}; model, tokenizer, metrics and card in "
                    f"{training_args.output_dir})")
    return trainer, metrics


def load_text_data(args):
    """Returns (DatasetDict with a train split and maybe validation, a short description of the source)."""
    from datasets import Dataset, DatasetDict, load_dataset

    if args.dataset_name:
        return load_dataset(args.dataset_name, args.dataset_config_name), args.dataset_name
    if args.train_file:
        files = {"train": args.train_file}
        if args.validation_file:
            files["validation"] = args.validation_file
        for path in files.values():
            if not os.path.isfile(path):
                raise DataError(f"data file {path} does not exist.")
        ext = os.path.splitext(args.train_file)[1].lower().lstrip(".")
        builder = {"txt": "text", "text": "text", "json": "json", "jsonl": "json", "csv": "csv"}.get(ext)
        if builder is None:
            raise DataError(f"--train_file {args.train_file}: use a .txt, .json, .jsonl or .csv file.")
        kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
        return load_dataset(builder, data_files=files, **kwargs), os.path.basename(args.train_file)
    from pydoc_data.topics import topics  # ~79 help topics of the Python language reference, ~460k characters

    names = sorted(topics)
    return DatasetDict(train=Dataset.from_dict({"text": [topics[n] for n in names], "topic": names})), "pydoc-topics"


def build_tokenizer(args, train_split):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    name = args.tokenizer_name or args.model_name_or_path
    if name is not None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name))
        except (OSError, ValueError) as err:
            raise ConfigError(f"tokenizer {name}: cannot load it: {err}") from None
        if tokenizer.eos_token_id is None:
            raise ConfigError(f"tokenizer {name} has no end-of-text (eos) token to separate documents.")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer

    texts = train_split[args.text_column]
    rank_zero_print(f"training a byte-level BPE tokenizer (vocabulary {args.vocab_size}) on {len(texts)} "
                    f"documents, {sum(map(len, texts)):,} characters ...")
    bpe = train_bpe(texts, args.vocab_size, [END_OF_TEXT])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT,
                                   unk_token=END_OF_TEXT, pad_token=END_OF_TEXT, model_max_length=args.block_size)


def build_model(args, tokenizer):
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    if args.model_name_or_path is None:
        config = GPT2Config(vocab_size=len(tokenizer), n_positions=args.block_size, n_embd=args.n_embd,
                            n_layer=args.n_layer, n_head=args.n_head, resid_pdrop=args.dropout,
                            embd_pdrop=args.dropout, attn_pdrop=args.dropout,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
        model = GPT2LMHeadModel(config)
        rank_zero_print(f"built GPT-2: {model.num_parameters():,} parameters "
                        f"(n_embd {args.n_embd}, n_layer {args.n_layer}, n_head {args.n_head})")
        return model

    try:
        model = AutoModelForCausalLM.from_pretrained(resolve_model_path(args.model_name_or_path))
    except ValueError as err:
        raise ConfigError(f"model_name_or_path {args.model_name_or_path} is not a causal language model: "
                          f"{err}") from None
    context = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    if context is not None and args.block_size > context:
        raise ConfigError(f"block_size={args.block_size} is longer than the context of {args.model_name_or_path} "
                          f"({context} tokens); lower --block_size.")
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        rank_zero_print(f"resizing the token embeddings to the tokenizer's {len(tokenizer)} tokens")
        model.resize_token_embeddings(len(tokenizer))
    return model


if __name__ == "__main__":
    run_main(main)
