"""Supervised fine-tuning (SFT) of a chat model with TRL's SFTTrainer made sharpness-aware by hf_sam.

Its default job (configs/sft_pydoc.yaml, read when no --config is given) builds a small Llama-style
causal LM from a config and a byte-level BPE tokenizer (with a chat template) trained on the text of
CPython's help topics (`pydoc_data.topics`, which ships with Python), then fine-tunes it with
SFT + SAM on a chat dataset made from the same topics: the user asks about a section of the
language reference ("Explain: The assert statement"), the assistant answers with the head of that
section. Only the answers are trained (prompt-completion data). It reports the loss and token
accuracy on held-out sections and answers one held-out question. No network needed.

    python scripts/train_sft.py                                       # = --config configs/sft_pydoc.yaml
    python scripts/train_sft.py --config configs/sft_pydoc.yaml --sam_rho 0 --output_dir runs/sft_no_sam
    python scripts/train_sft.py --config configs/sft_pydoc.yaml --sam_variant asam --sam_rho 0.5
    python scripts/train_sft.py --config configs/hub/sft_qwen_chat.yaml     # needs network and a GPU

Every SFTConfig flag works (--max_length, --packing, --assistant_only_loss, ...), every SAM setting
as --sam_<name> (hf_sam.with_sam_args(SFTConfig)), and LoRA through --lora_r 16. Needs TRL:
pip install -e ".[trl]".
"""

import os
import re
from dataclasses import dataclass, field

from hf_sam_scripts.arguments import CommonArguments, LoraArguments
from hf_sam_scripts.cli import SAM_SFT_CONFIG, parse_script_args
from hf_sam_scripts.data import take
from hf_sam_scripts.errors import ConfigError, DataError, run_main
from hf_sam_scripts.models import apply_lora, finetuned_from, resolve_model_path, train_bpe
from hf_sam_scripts.run import prepare_run, rank_zero_print, train_and_finish

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "sft_pydoc.yaml")
END_OF_TURN = "<|end|>"
# A minimal chat template for the tokenizer trained here (pretrained chat models bring their own).
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]


@dataclass
class ScriptArguments(CommonArguments):
    # --- model: a pretrained causal LM, or (default) a Llama-style model built from these sizes ---
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "Pretrained causal LM (a chat model for chat data): a Hub id (Qwen/Qwen2.5-0.5B-Instruct), a "
                "local folder, or package:<module>/<folder>. Default: a Llama-style model built from the sizes."})
    hidden_size: int = field(default=128, metadata={"help": "Built model: width."})
    num_layers: int = field(default=2, metadata={"help": "Built model: number of transformer blocks."})
    num_heads: int = field(default=4, metadata={"help": "Built model: attention heads per block."})
    # --- tokenizer: the model's, or (default) a BPE with a chat template trained on the topics ---
    vocab_size: int = field(default=1024, metadata={"help": "Built model: size of the trained BPE vocabulary."})
    # --- data: a Hub chat dataset, or (default) questions and answers made from pydoc_data.topics ---
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str | None = field(default=None, metadata={
        "help": "Held-out split; default: a share of the training examples (eval_fraction)."})
    answer_chars: int = field(default=300, metadata={
        "help": "Pydoc data: the answer is the first N characters of a section (cut at a word boundary)."})
    eval_fraction: float = field(default=0.1, metadata={
        "help": "Share of the examples held out when there is no test split."})


def parse_args(argv=None):
    """(script_args, lora_args, training_args, reproduce command): defaults < --config < flags.

    The training arguments are `hf_sam.with_sam_args(trl.SFTConfig)`: SFTConfig + every SAM setting.
    """
    return parse_script_args(__file__, __doc__, [(ScriptArguments, "train_sft.py settings"),
                                                 (LoraArguments, "LoRA (PEFT)")],
                             SAM_SFT_CONFIG, DEFAULT_CONFIG, argv)


def main(script_args, lora_args, training_args, command=None):
    """Fine-tune, evaluate, answer one held-out question and save. Returns (trainer, metrics)."""
    from trl import SFTTrainer

    from hf_sam import with_sam

    # 1. Checks that need no data, threads, the seed.
    if script_args.model_name_or_path is None and script_args.hidden_size % script_args.num_heads:
        raise ConfigError(f"hidden_size={script_args.hidden_size} must be a multiple of "
                          f"num_heads={script_args.num_heads}.")
    resume = prepare_run(script_args, training_args)

    # 2. Chat examples (train and held-out), the tokenizer and the model.
    splits, source = load_chat_data(script_args)
    tokenizer = build_tokenizer(script_args, splits["train"])
    model = build_model(script_args, tokenizer, training_args.max_length)
    model = apply_lora(model, lora_args, task_type="CAUSAL_LM", default_targets=[["q_proj", "v_proj"], ["c_attn"]])

    # 3. SFT with SAM: SFTTrainer's data handling, loss and metrics; hf_sam's training step.
    trainer = with_sam(SFTTrainer)(model=model, args=training_args, train_dataset=splits["train"],
                                   eval_dataset=splits["test"], processing_class=tokenizer)
    metrics = train_and_finish(trainer, resume, command, script_args.sam_measure, tasks="text-generation",
                               dataset=source, finetuned_from=finetuned_from(script_args.model_name_or_path))

    # 4. Held-out loss and token accuracy, and one answer.
    rank_zero_print(f"held-out loss {metrics['eval']['eval_loss']:.4f}, token accuracy "
                    f"{metrics['eval'].get('eval_mean_token_accuracy', float('nan')):.3f}")
    question = question_of(splits["test"][0])
    if question and tokenizer.chat_template and trainer.is_world_process_zero():
        print(f"Q: {question[-1]['content']}\nA: {answer(trainer.model, tokenizer, question)}")
    return trainer, metrics


def run(argv=None):
    """main(*parse_args(argv)): parse and train, for notebooks and tests."""
    return main(*parse_args(argv))


def pydoc_sections(answer_chars):
    """(heading, text head) for every section of the Python help topics, each heading once."""
    from pydoc_data.topics import topics

    out = {}
    for name in sorted(topics):
        lines = topics[name].split("\n")
        starts = [i for i in range(len(lines) - 1) if lines[i].strip()
                  and re.fullmatch(r"[*=\-~^]{3,}", lines[i + 1].strip())]
        for k, i in enumerate(starts):
            end = starts[k + 1] if k + 1 < len(starts) else len(lines)
            body = " ".join(" ".join(lines[i + 2:end]).split())
            if body and lines[i].strip() not in out:
                cut = body[:answer_chars]
                out[lines[i].strip()] = cut if len(body) <= answer_chars else cut.rsplit(" ", 1)[0]
    return out


def load_chat_data(args):
    """Returns ({"train": Dataset, "test": Dataset}, a short description of the source)."""
    from datasets import Dataset, load_dataset

    if args.dataset_name:
        data = load_dataset(args.dataset_name, args.dataset_config_name)
        source = args.dataset_name
        if args.dataset_train_split not in data:
            raise DataError(f"{source} has no split {args.dataset_train_split!r}; it has {', '.join(data)}.")
        if args.dataset_test_split is not None and args.dataset_test_split not in data:
            raise DataError(f"{source} has no split {args.dataset_test_split!r}; it has {', '.join(data)}.")
        train = data[args.dataset_train_split]
    else:
        sections = pydoc_sections(args.answer_chars)
        train = Dataset.from_dict({
            "prompt": [[{"role": "user", "content": f"Explain: {heading}"}] for heading in sections],
            "completion": [[{"role": "assistant", "content": text}] for text in sections.values()]})
        source = "pydoc-topics-chat"
    if args.dataset_name and args.dataset_test_split is not None:
        test = data[args.dataset_test_split]
    else:
        if not 0 < args.eval_fraction < 1:
            raise ConfigError(f"eval_fraction={args.eval_fraction} must be in (0, 1) without a test split.")
        parts = train.train_test_split(test_size=args.eval_fraction, seed=args.split_seed)
        train, test = parts["train"], parts["test"]
    splits = {"train": take(train, args.max_train_samples), "test": take(test, args.max_eval_samples)}
    rank_zero_print(f"data: {source}: train {len(splits['train'])}, held-out {len(splits['test'])} examples")
    return splits, source


def build_tokenizer(args, train_split):
    """The pretrained model's tokenizer, or a byte-level BPE with role tokens and a chat template."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if args.model_name_or_path is not None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(args.model_name_or_path))
        except (OSError, ValueError) as err:
            raise ConfigError(f"tokenizer of {args.model_name_or_path}: cannot load it: {err}") from None
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer

    texts = [m[0]["content"] for m in train_split["prompt"]] + [m[0]["content"] for m in train_split["completion"]]
    bpe = train_bpe(texts, args.vocab_size, [END_OF_TURN, *ROLE_TOKENS])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=END_OF_TURN, pad_token=END_OF_TURN,
                                        unk_token=END_OF_TURN, additional_special_tokens=ROLE_TOKENS)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(args, tokenizer, max_length):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if args.model_name_or_path is None:
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=args.hidden_size,
                             intermediate_size=4 * args.hidden_size, num_hidden_layers=args.num_layers,
                             num_attention_heads=args.num_heads, num_key_value_heads=args.num_heads,
                             max_position_embeddings=max_length or 1024, tie_word_embeddings=True,
                             bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
        model = LlamaForCausalLM(config)
        rank_zero_print(f"built a Llama-style model: {model.num_parameters():,} parameters (hidden_size "
                        f"{args.hidden_size}, {args.num_layers} layers, {args.num_heads} heads)")
        return model
    try:
        return AutoModelForCausalLM.from_pretrained(resolve_model_path(args.model_name_or_path))
    except (OSError, ValueError) as err:
        raise ConfigError(f"model_name_or_path {args.model_name_or_path} cannot be loaded as a causal LM: "
                          f"{err}") from None


def question_of(example):
    """The chat prompt of an example: its `prompt` messages, or its `messages` before the first answer."""
    if isinstance(example.get("prompt"), list):
        return example["prompt"]
    messages = example.get("messages") or []
    first_answer = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), len(messages))
    return messages[:first_answer]


def answer(model, tokenizer, prompt, max_new_tokens=40):
    """Greedy answer of `model` to a chat prompt (a list of messages)."""
    import torch

    ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = {k: v.to(model.device) for k, v in ids.items()}
    model.eval()
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, no_repeat_ngram_size=3,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


if __name__ == "__main__":
    run_main(main, parse_args)
