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
from dataclasses import dataclass, field

from hf_sam_scripts.arguments import CommonArguments, LoraArguments, TextFileArguments
from hf_sam_scripts.cli import SAM_TRAINING_ARGUMENTS, parse_script_args
from hf_sam_scripts.data import load_text_data, require_columns, split_train_validation_test, take
from hf_sam_scripts.errors import ConfigError, DataError, run_main
from hf_sam_scripts.models import apply_lora, finetuned_from, resolve_model_path, train_bpe
from hf_sam_scripts.run import prepare_run, rank_zero_print, train_and_finish

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "gpt_pydoc.yaml")
END_OF_TEXT = "<|endoftext|>"


@dataclass
class ScriptArguments(TextFileArguments, CommonArguments):
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
    # --- data: a Hub dataset (e.g. wikitext), local files, or (default) CPython's pydoc topics ---
    validation_fraction: float = field(default=0.1, metadata={
        "help": "Share of the training documents held out when there is no validation split."})
    preprocessing_num_workers: int | None = field(default=None, metadata={
        "help": "Processes for tokenizing and grouping (datasets.map num_proc); default: one."})


def parse_args(argv=None):
    """(script_args, lora_args, training_args, reproduce command): defaults < --config < flags."""
    return parse_script_args(__file__, __doc__, [(ScriptArguments, "train_lm.py settings"),
                                                 (LoraArguments, "LoRA (PEFT)")],
                             SAM_TRAINING_ARGUMENTS, DEFAULT_CONFIG, argv)


def main(script_args, lora_args, training_args, command=None):
    """Train, evaluate and save. Returns (trainer, metrics) for notebooks and tests."""
    from transformers import default_data_collator

    from hf_sam import SAMTrainer

    # 1. Checks that need no data; threads, seed. Evaluation needs only the loss (perplexity =
    #    exp(loss)): every logit of a 50k-token vocabulary for the held-out set would take gigabytes.
    if script_args.model_name_or_path is None and script_args.n_embd % script_args.n_head:
        raise ConfigError(f"n_embd={script_args.n_embd} must be a multiple of n_head={script_args.n_head}.")
    resume = prepare_run(script_args, training_args)
    training_args.prediction_loss_only = True

    # 2. Documents: train and validation splits of a text column. Held-out documents are whole
    #    documents, so no training block shares text with the held-out ones.
    splits, source = load_text_data(script_args, default=pydoc_topics)
    for name in splits:
        require_columns(splits[name], [(script_args.text_column, "text_column")], f"{source} ({name} split)")
    splits = split_train_validation_test(splits, script_args.validation_fraction, 0.0,
                                         seed=script_args.split_seed, need_test=False)
    rank_zero_print(f"data: {source}: " + ", ".join(f"{name} {len(ds)} documents" for name, ds in splits.items()))

    # 3. Tokenizer (the model's / a named one, or a BPE trained on the training split), then blocks.
    tokenizer = build_tokenizer(script_args, splits["train"])
    train_data, eval_data = token_blocks(splits, tokenizer, script_args, source)

    # 4. Model: pretrained or a GPT-2 built from the sizes; LoRA when asked.
    path = resolve_model_path(script_args.model_name_or_path)
    model = build_model(script_args, path, tokenizer)
    model = apply_lora(model, lora_args, task_type="CAUSAL_LM", default_targets=[["c_attn"], ["q_proj", "v_proj"]],
                       weights_path=path)

    # 5. Train with SAM; held-out perplexity; save model + tokenizer + metrics + model card.
    trainer = SAMTrainer(model=model, args=training_args, train_dataset=train_data, eval_dataset=eval_data,
                         data_collator=default_data_collator, processing_class=tokenizer)
    metrics = train_and_finish(trainer, resume, command, script_args.sam_measure, tasks="text-generation",
                               dataset=source, finetuned_from=finetuned_from(script_args.model_name_or_path),
                               extra_eval=add_perplexity)
    rank_zero_print(f"held-out perplexity: {metrics['eval']['eval_perplexity']:.2f} "
                    f"(loss {metrics['eval']['eval_loss']:.4f}; model, tokenizer, metrics and card in "
                    f"{training_args.output_dir})")
    return trainer, metrics


def run(argv=None):
    """main(*parse_args(argv)): parse and train, for notebooks and tests."""
    return main(*parse_args(argv))


def add_perplexity(eval_metrics):
    eval_metrics["eval_perplexity"] = math.exp(min(eval_metrics["eval_loss"], 700.0))


def pydoc_topics():
    """The ~79 help topics of the Python language reference (~460k characters), one document each."""
    from datasets import Dataset, DatasetDict
    from pydoc_data.topics import topics

    names = sorted(topics)
    return DatasetDict(train=Dataset.from_dict({"text": [topics[n] for n in names], "topic": names})), "pydoc-topics"


def token_blocks(splits, tokenizer, args, source):
    """Tokenize every document (+ end-of-text), concatenate, cut into blocks of block_size tokens.

    The labels are the inputs: the model shifts them by one position inside its loss. Returns
    (train blocks, validation blocks), capped by max_train_samples / max_eval_samples.
    """

    block_size, text_column, eos = args.block_size, args.text_column, tokenizer.eos_token_id

    def tokenize(batch):
        ids = tokenizer(batch[text_column], add_special_tokens=False, verbose=False)["input_ids"]
        return {"input_ids": [x + [eos] for x in ids]}

    def group_into_blocks(batch):
        stream = [token for ids in batch["input_ids"] for token in ids]
        usable = len(stream) // block_size * block_size  # the remainder of each batch of documents is dropped
        blocks = [stream[i:i + block_size] for i in range(0, usable, block_size)]
        return {"input_ids": blocks, "labels": [list(b) for b in blocks]}

    workers = args.preprocessing_num_workers
    tokenized = splits.map(tokenize, batched=True, remove_columns=splits["train"].column_names, num_proc=workers,
                           desc="Tokenizing")
    lm_data = tokenized.map(group_into_blocks, batched=True, batch_size=1000, num_proc=workers,
                            desc=f"Grouping into blocks of {block_size} tokens")
    train_data = take(lm_data["train"], args.max_train_samples)
    eval_data = take(lm_data["validation"], args.max_eval_samples)
    for name, ds in (("train", train_data), ("validation", eval_data)):
        if len(ds) == 0:
            raise DataError(f"{source}: the {name} split has fewer than block_size={block_size} tokens; lower "
                            "--block_size or give it more text (--validation_fraction for the held-out part).")
    rank_zero_print(f"blocks of {block_size} tokens: train {len(train_data)}, validation {len(eval_data)}")
    return train_data, eval_data


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


def build_model(args, path, tokenizer):
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel


    if path is None:
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
        model = AutoModelForCausalLM.from_pretrained(path)
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
    run_main(main, parse_args)
