"""scripts/train_sft.py: chat SFT + SAM with TRL on questions built from the pydoc topics, offline."""

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("trl")
REPO = Path(__file__).resolve().parents[1]

from hf_sam_scripts.errors import ConfigError  # noqa: E402
from scripts import train_sft  # noqa: E402

SFT_CONFIG = str(REPO / "configs" / "sft_pydoc.yaml")
# A 1-layer width-32 model on 64-token examples with a 300-token BPE vocabulary, a few steps.
TINY = ["--hidden_size", "32", "--num_layers", "1", "--num_heads", "2", "--vocab_size", "300", "--max_length", "64",
        "--answer_chars", "120", "--max_steps", "4", "--max_train_samples", "32", "--max_eval_samples", "8",
        "--logging_steps", "2", "--eval_strategy", "steps", "--eval_steps", "2", "--save_strategy", "steps",
        "--save_steps", "4", "--per_device_train_batch_size", "8", "--torch_threads", "1"]


def run(argv):
    return train_sft.main(*train_sft.parse_args(argv))


def test_train_sft_on_pydoc_chat(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "sft"
    trainer, metrics = run(["--config", SFT_CONFIG, "--output_dir", str(out), "--sam_rho", "0.1", *TINY])

    assert type(trainer).__name__ == "SAMSFTTrainer" and trainer.sam_config.rho == 0.1
    train_logs = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["step"] for e in train_logs] == [2, 4]
    for e in train_logs:  # SAM's and SFT's metrics in the same log lines
        assert e["sam/perturbation_norm"] == pytest.approx(0.1, rel=1e-5)
        assert 0 <= e["mean_token_accuracy"] <= 1 and e["num_tokens"] > 0
    eval_results = json.loads((out / "eval_results.json").read_text())
    assert eval_results["eval_loss"] < math.log(300) * 1.2 and "eval_mean_token_accuracy" in eval_results
    printed = capsys.readouterr().out
    assert "held-out loss" in printed and "Q: Explain: " in printed and "\nA:" in printed
    checkpoint = out / "checkpoint-4"  # with the tokenizer and the (pickled) arguments
    assert (checkpoint / "tokenizer.json").is_file() and (checkpoint / "training_args.bin").is_file()
    card = (out / "README.md").read_text()
    assert "scripts/train_sft.py --config" in card and "hf-sam" in card

    # model and tokenizer (with its chat template) load back from the output folder
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert len(tokenizer) == 300 and model.config.hidden_size == 32
    assert train_sft.answer(model, tokenizer, [{"role": "user", "content": "Explain: Literals"}], 3) is not None


def test_pydoc_chat_data():
    sections = train_sft.pydoc_sections(answer_chars=120)
    assert len(sections) > 150 and "The \"assert\" statement" in sections
    for heading, text in sections.items():
        assert 0 < len(text) <= 120 and "\n" not in text and "***" not in text, heading
    # the answer is the section's text, cut at a word boundary
    assert sections["The \"assert\" statement"].startswith("Assert statements are a convenient way")
    assert not sections["The \"assert\" statement"].endswith(" ")
    # the question shown after training: a prompt's messages, or a conversation's turns before the first answer
    user, bot = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}
    assert train_sft.question_of({"prompt": [user], "completion": [bot]}) == [user]
    assert train_sft.question_of({"messages": [user, bot, user, bot]}) == [user]


def test_chat_template_prompt_is_a_prefix(tmp_path):
    """SFT trains on the completion only: the prompt's tokens must be a prefix of prompt + completion's."""
    from datasets import Dataset

    class Args:
        model_name_or_path, vocab_size = None, 300

    split = Dataset.from_dict({"prompt": [[{"role": "user", "content": "Explain: Literals"}]],
                               "completion": [[{"role": "assistant", "content": "Python has literals."}]]})
    tokenizer = train_sft.build_tokenizer(Args, split)
    prompt = split[0]["prompt"]
    prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
    full_ids = tokenizer.apply_chat_template(prompt + split[0]["completion"], tokenize=True, return_dict=True)
    prompt_ids, full_ids = prompt_ids["input_ids"], full_ids["input_ids"]
    assert full_ids[:len(prompt_ids)] == prompt_ids and len(full_ids) > len(prompt_ids)
    assert full_ids[-2] == tokenizer.eos_token_id  # each turn ends with <|end|>, the model's end of answer


def test_bad_settings_fail_before_training(tmp_path):
    with pytest.raises(ConfigError, match="hidden_size=30 must be a multiple of num_heads=4"):
        run(["--config", SFT_CONFIG, "--hidden_size", "30", "--output_dir", str(tmp_path)])
    with pytest.raises(ConfigError, match="eval_fraction=0.0"):
        run(["--config", SFT_CONFIG, "--eval_fraction", "0", "--output_dir", str(tmp_path)])
    with pytest.raises(ConfigError, match="rho=-1"):
        train_sft.parse_args(["--config", SFT_CONFIG, "--sam_rho", "-1", "--output_dir", str(tmp_path)])


def test_shipped_sft_configs_parse(tmp_path):
    for config in (REPO / "configs" / "sft_pydoc.yaml", REPO / "configs" / "hub" / "sft_qwen_chat.yaml"):
        gpu_only = ["--bf16", "false"] if config.parent.name == "hub" else []  # the Hub example asks for a GPU
        script_args, _, training_args, command = train_sft.parse_args(
            ["--config", str(config), "--output_dir", str(tmp_path), *gpu_only])
        assert training_args.sam_config.variant == "sam" and training_args.max_length > 0, config
        assert "scripts/train_sft.py --config" in command
    assert script_args.model_name_or_path == "Qwen/Qwen2.5-0.5B-Instruct" and script_args.dataset_test_split == "test"
