"""The scripts' start: thread choice, --help and bad keys before the heavy imports, one-line refusals."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hf_sam_scripts import cli, threads
from hf_sam_scripts.errors import ConfigError, run_main

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def machine(monkeypatch, cores, load, omp=None, local_world=None):
    monkeypatch.setattr(threads, "available_cores", lambda: cores)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (load, load, load))
    for name, value in (("OMP_NUM_THREADS", omp), ("LOCAL_WORLD_SIZE", local_world), ("WORLD_SIZE", None)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, str(value))


def test_threads_follow_the_free_cores_and_the_processes(monkeypatch):
    machine(monkeypatch, cores=2, load=0.3)
    assert threads.choose_threads() == 2  # idle 2-core machine: both
    machine(monkeypatch, cores=2, load=3.2)
    assert threads.choose_threads() == 1  # busy: one (never 0)
    machine(monkeypatch, cores=2, load=0.0, local_world=2)
    assert threads.choose_threads() == 1  # two processes of a launch on 2 cores: one each
    machine(monkeypatch, cores=16, load=4.5, local_world=4)
    assert threads.choose_threads() == 3  # 12 free cores over 4 processes
    assert threads.choose_threads(processes=1) == 12
    machine(monkeypatch, cores=16, load=0.0, omp=5)
    assert threads.choose_threads() == 5  # the user's OMP_NUM_THREADS
    assert threads.choose_threads(requested=7) == 7  # --torch_threads wins
    with pytest.raises(ValueError, match="torch_threads"):
        threads.choose_threads(requested=0)


def run_script(*args, code=None):
    command = [sys.executable, "-c", code] if code else [sys.executable, str(REPO / "scripts" / "train_vit.py"), *args]
    return subprocess.run(command, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_help_and_a_misspelt_key_come_before_torch_is_imported(tmp_path):
    config = tmp_path / "typo.yaml"
    config.write_text("learning_rat: 0.1\n")
    code = f"""
import json, sys
from scripts import train_vit
from hf_sam_scripts.errors import ConfigError
try:
    train_vit.parse_args(["--config", {str(config)!r}])
except ConfigError as err:
    message = str(err)
try:
    train_vit.parse_args(["--lerning_rate", "1"])
except ConfigError as err:
    flag = str(err)
print(json.dumps([message, flag, sorted(m for m in ("torch", "transformers", "hf_sam") if m in sys.modules)]))
"""
    result = run_script(code=code)
    message, flag, heavy = json.loads(result.stdout.strip().splitlines()[-1])
    assert "unknown setting 'learning_rat'. Did you mean learning_rate?" in message and str(config) in message
    assert "unknown setting 'lerning_rate'" in flag and "learning_rate" in flag
    assert heavy == []

    shown = run_script("--help")
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    groups = ["train_vit.py settings:", "LoRA (PEFT):", "SAM settings (hf_sam):",
              "Trainer settings (transformers.TrainingArguments"]
    positions = [out.index(g) for g in groups]
    assert positions == sorted(positions)
    assert "--sam_rho" in out and "--learning_rate" in out and "config: 0.002" in out  # the config's value shown
    assert len(out.splitlines()) < 500

    typo = run_script("--config", str(config))
    assert typo.returncode == 2 and typo.stderr.strip().count("\n") == 0 and "Traceback" not in typo.stderr


@pytest.mark.parametrize("script", ["train_vit", "train_lm", "train_text_cls", "train_sft"])
def test_quick_names_are_the_parser_names(script):
    """The names read from the source are exactly the flags of the real parser (no valid key refused)."""
    if script == "train_sft":
        pytest.importorskip("trl")
    import importlib

    from hf_sam_scripts.parser import ScriptParser

    module = importlib.import_module(f"scripts.{script}")
    sources, load = cli.SAM_SFT_CONFIG if script == "train_sft" else cli.SAM_TRAINING_ARGUMENTS
    classes = [module.ScriptArguments, cli_lora()]
    quick = {f.name for cls in classes for f in cli.dataclass_flags(cls, "")} | {
        f.name for f in cli.training_flags(sources)} | set(cli.PARSER_OPTIONS)
    parser = ScriptParser((*classes, load()))
    real = {a.dest for a in parser._actions if a.option_strings and a.dest != "help"}
    assert quick == real


def cli_lora():
    from hf_sam_scripts.arguments import LoraArguments

    return LoraArguments


def test_refusals_print_one_line(capsys):
    from hf_sam import SAMConfig

    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: SAMConfig(rho=-1))  # a ValueError raised inside hf_sam
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "rho" in err
    with pytest.raises(SystemExit):
        run_main(lambda: (_ for _ in ()).throw(ConfigError("bad flag")))
    assert capsys.readouterr().err == "error: bad flag\n"
    with pytest.raises(ValueError):  # a bug elsewhere keeps its traceback
        run_main(lambda: int("x"))


def test_prepare_run_sets_threads_and_no_pinning_without_an_accelerator(tmp_path, monkeypatch):
    import torch

    from hf_sam import SAMTrainingArguments
    from hf_sam_scripts.arguments import CommonArguments
    from hf_sam_scripts.run import has_accelerator, prepare_run

    before = torch.get_num_threads()
    args = SAMTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    try:
        prepare_run(CommonArguments(torch_threads=1), args)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert args.dataloader_pin_memory is has_accelerator()


def test_lora_saves_ask_the_hub_nothing_when_the_weights_are_local(tmp_path, monkeypatch):
    """PEFT decides at each save whether to store the embeddings by reading the base model's config.json,
    from the Hub when the model is named by a Hub id; with the local folder given, no save asks."""
    import peft.utils.save_and_load as peft_save
    from transformers import BertConfig, BertForSequenceClassification

    from hf_sam_scripts.arguments import LoraArguments
    from hf_sam_scripts.models import apply_lora

    asked = []
    monkeypatch.setattr(peft_save, "check_file_exists_on_hf_hub", lambda repo, name, **kw: asked.append(repo))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    lora = LoraArguments(lora_r=2)
    for local, expected in ((True, []), (False, ["org/tiny-bert"])):
        base = BertForSequenceClassification(BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1,
                                                        num_attention_heads=2, intermediate_size=16))
        folder = tmp_path / f"base_{local}"
        base.config.save_pretrained(folder)
        base.config._name_or_path = base.name_or_path = "org/tiny-bert"  # as train_text_cls's base_model_id
        model = apply_lora(base, lora, task_type="SEQ_CLS", default_targets=["query", "value"],
                           weights_path=folder if local else None)
        asked.clear()
        model.save_pretrained(tmp_path / f"out_{local}")
        assert asked == expected
        assert (tmp_path / f"out_{local}" / "adapter_model.safetensors").is_file()
