"""scripts/measure_sharpness.py on a tiny ViT digits run made here, and the scripts' --sam_measure option."""

import json
from pathlib import Path

import pytest

import tiny  # tests/ is on the path under pytest (rootdir conftest)
from test_sharpness import hand_m_sharpness

from hf_sam import SAMTrainer, SAMTrainingArguments
from hf_sam.sharpness import hessian_eigenvalues
from hf_sam_scripts import run as script_run
from hf_sam_scripts.errors import ConfigError, ScriptError
from hf_sam_scripts.parser import ScriptParser
from scripts import measure_sharpness, train_vit

REPO = Path(__file__).resolve().parents[1]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY_VIT = ["--config", str(REPO / "configs" / "vit_digits.yaml"), "--max_steps", "4", "--save_strategy", "steps",
            "--save_steps", "2", "--eval_strategy", "no", "--max_train_samples", "64", "--max_eval_samples", "40",
            "--hidden_size", "16", "--intermediate_size", "32", "--num_attention_heads", "2",
            "--num_hidden_layers", "1", "--per_device_train_batch_size", "16", "--torch_threads", "1",
            "--save_total_limit", "3", "--logging_steps", "2"]


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("vit_run")
    trainer, _ = train_vit.run([*TINY_VIT, "--output_dir", str(out)])
    return out, trainer


def test_measures_every_checkpoint_and_the_final_model_on_the_run_data(vit_run, tmp_path, capsys):
    run, trainer = vit_run
    png, js = tmp_path / "s.png", tmp_path / "s.json"
    rows = measure_sharpness.main([str(run), "--max_samples", "32", "--batch_size", "16", "--m", "8",
                                   "--iters", "30", "--output", str(png), "--json", str(js)])
    assert [(r["label"], r["step"]) for r in rows] == [("checkpoint-2", 2), ("checkpoint-4", 4), ("final", 4)]
    assert png.read_bytes()[:8] == PNG_MAGIC and json.loads(js.read_text()) == rows
    printed = capsys.readouterr().out
    assert "checkpoint-2" in printed and "top_eigenvalue" in printed and f"wrote {png}" in printed
    # the script's numbers are the trained model's on the run's first 32 validation examples
    model = trainer.model.eval()
    trainer.args.per_device_eval_batch_size = 16
    batches = list(trainer.get_eval_dataloader())[:2]
    assert sum(len(b["labels"]) for b in batches) == 32
    final = rows[-1]
    assert final["m_sharpness"] == pytest.approx(hand_m_sharpness(model, batches, 0.05, 8), abs=1e-5)
    assert final["top_eigenvalue"] == pytest.approx(hessian_eigenvalues(model, batches, iters=30, tol=1e-3,
                                                                        which="largest")[0],
                                                    rel=1e-4)
    assert rows[1]["m_sharpness"] == pytest.approx(final["m_sharpness"], abs=1e-6)  # same weights
    assert rows[0]["m_sharpness"] != final["m_sharpness"]


def test_replayed_command_never_writes_to_the_run():
    argv = ["--config", "c.yaml", "--output_dir", "/runs/a", "--report_to", "tensorboard", "wandb",
            "--overwrite_output_dir", "true", "--seed", "1", "--resume_from_checkpoint=true"]
    assert measure_sharpness.replay_argv(argv, "/tmp/x") == [
        "--config", "c.yaml", "--seed", "1", "--output_dir", "/tmp/x", "--report_to", "none"]
    script, rest = measure_sharpness.split_command("accelerate launch --num_processes 2 scripts/train_lm.py --seed 3")
    assert (script, rest) == ("scripts/train_lm.py", ["--seed", "3"])


def test_runs_without_a_card_or_models_are_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ScriptError, match="neither a final model nor checkpoint"):
        measure_sharpness.main([str(tmp_path / "empty")])
    (tmp_path / "nocard").mkdir()
    (tmp_path / "nocard" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ScriptError, match="no model card"):
        measure_sharpness.main([str(tmp_path / "nocard")])
    with pytest.raises(ScriptError, match="not a run folder"):
        measure_sharpness.main([str(tmp_path / "missing")])


# --- --sam_measure in the training scripts' parser ----------------------------------------------


def test_sam_measure_option_logs_sharpness_at_each_evaluation(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("sam_measure: [top_eigenvalue]\nsam_rho: 0.1\n")
    parser = ScriptParser((SAMTrainingArguments,))
    (args,) = parser.parse_args_and_config(["--config", str(config), "--output_dir", str(tmp_path)])
    assert parser.sam_measure == ["top_eigenvalue"] and args.sam_rho == pytest.approx(0.1)
    (args,) = parser.parse_args_and_config(
        ["--config", "none", "--output_dir", str(tmp_path), "--sam_measure", "m_sharpness", "trace",
         "--eval_strategy", "steps", "--eval_steps", "2", "--max_steps", "4", "--use_cpu", "true",
         "--report_to", "none", "--per_device_train_batch_size", "8", "--save_strategy", "no"])
    assert parser.sam_measure == ["m_sharpness", "trace"]
    trainer = SAMTrainer(model=tiny.MLP(), args=args, train_dataset=tiny.Blobs(n=64),
                         eval_dataset=tiny.Blobs(n=16, seed=3))
    callback = script_run.attach_sharpness(trainer, parser)
    assert callback in trainer.callback_handler.callbacks
    trainer.train()
    logged = [e for e in trainer.state.log_history if "sharpness/m_sharpness" in e]
    assert [e["step"] for e in logged] == [2, 4] and all("sharpness/trace" in e for e in logged)
    assert "sharpness/top_eigenvalue" not in logged[0]


def test_sam_measure_refuses_bad_settings(tmp_path):
    parser = ScriptParser((SAMTrainingArguments,))
    with pytest.raises(SystemExit):  # argparse: not one of the choices
        parser.parse_args_and_config(["--output_dir", str(tmp_path), "--sam_measure", "flatness"])
    (args,) = parser.parse_args_and_config(["--output_dir", str(tmp_path), "--sam_measure", "trace",
                                            "--use_cpu", "true", "--report_to", "none"])
    trainer = SAMTrainer(model=tiny.MLP(), args=args, train_dataset=tiny.Blobs())
    with pytest.raises(ConfigError, match="eval_strategy"):
        script_run.attach_sharpness(trainer, parser)
    (args,) = parser.parse_args_and_config(["--output_dir", str(tmp_path), "--use_cpu", "true"])
    assert parser.sam_measure is None and script_run.attach_sharpness(trainer, parser) is None
