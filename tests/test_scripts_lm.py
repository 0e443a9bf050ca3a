"""scripts/train_lm.py: tiny GPT-2 pretraining on pydoc topics and on local files, offline."""

import json
from pathlib import Path

import pytest

from hf_sam_scripts.errors import ConfigError, DataError
from scripts import train_lm

REPO = Path(__file__).resolve().parents[1]

LM_CONFIG = str(REPO / "configs" / "gpt_pydoc.yaml")
# A 1-layer width-32 GPT-2 on 32-token blocks with a 300-token BPE vocabulary, a few steps.
TINY = ["--n_embd", "32", "--n_layer", "1", "--n_head", "2", "--block_size", "32", "--vocab_size", "300",
        "--max_steps", "4", "--max_train_samples", "64", "--max_eval_samples", "16", "--logging_steps", "2",
        "--eval_strategy", "steps", "--eval_steps", "2", "--save_strategy", "steps", "--save_steps", "4",
        "--per_device_train_batch_size", "8", "--torch_threads", "1"]


def test_train_lm_on_pydoc_topics(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "gpt"
    trainer, metrics = train_lm.run(["--config", LM_CONFIG, "--output_dir", str(out), *TINY])

    eval_results = json.loads((out / "eval_results.json").read_text())
    assert eval_results["eval_perplexity"] == pytest.approx(2.718281828 ** eval_results["eval_loss"], rel=1e-4)
    assert eval_results["eval_perplexity"] < 300 * 1.5  # at most a little worse than uniform over the vocabulary
    assert "held-out perplexity:" in capsys.readouterr().out
    assert any("sam/sharpness" in e for e in trainer.state.log_history)
    assert (out / "checkpoint-4" / "tokenizer.json").is_file()  # the trained tokenizer is part of every checkpoint
    card = (out / "README.md").read_text()
    assert "scripts/train_lm.py --config" in card and "hf-sam" in card

    # model and tokenizer load back from the output folder and generate
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert len(tokenizer) == 300 and model.config.n_embd == 32 and model.config.n_positions == 32
    ids = tokenizer("The assert statement", return_tensors="pt")["input_ids"]
    generated = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert generated.shape[1] > ids.shape[1]


def test_train_file_txt_and_missing_text_column(tmp_path):
    paragraphs = [f"Paragraph {i}: the quick brown fox jumps over the lazy dog {i} times. " * 3 for i in range(40)]
    text_file = tmp_path / "corpus.txt"
    text_file.write_text("\n\n".join(paragraphs))
    trainer, metrics = train_lm.run(["--config", LM_CONFIG, "--train_file", str(text_file),
                                      "--output_dir", str(tmp_path / "txt"), *TINY, "--max_steps", "2",
                                      "--save_strategy", "no", "--eval_strategy", "no"])
    assert trainer.state.global_step == 2 and "eval_perplexity" in metrics["eval"]

    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": p}) for p in paragraphs))
    with pytest.raises(DataError, match=r"no column 'text'.*--text_column.*body"):
        train_lm.run(["--config", LM_CONFIG, "--train_file", str(jsonl), "--output_dir", str(tmp_path / "j")])


def test_bad_settings_fail_before_training(tmp_path):
    with pytest.raises(ConfigError, match="n_embd=30 must be a multiple of n_head=4"):
        train_lm.run(["--config", LM_CONFIG, "--n_embd", "30", "--output_dir", str(tmp_path)])
    with pytest.raises(DataError, match="does not exist"):
        train_lm.run(["--config", LM_CONFIG, "--train_file", str(tmp_path / "missing.txt"),
                       "--output_dir", str(tmp_path)])
    with pytest.raises(DataError, match="fewer than block_size"):
        train_lm.run(["--config", LM_CONFIG, *TINY, "--block_size", "100000", "--output_dir", str(tmp_path)])
