"""Settings: one source of truth, parsing from the command line and YAML, refusals with clear messages."""

import math

import pytest
import yaml
from transformers import HfArgumentParser, TrainingArguments

import tiny
from hf_sam import SAMConfig, SAMTrainer, SAMTrainingArguments
from hf_sam.config import PREFIX


def test_every_setting_is_an_argument_with_the_same_default_and_help():
    import dataclasses

    arg_fields = {f.name: f for f in dataclasses.fields(SAMTrainingArguments)}
    for f in dataclasses.fields(SAMConfig):
        af = arg_fields[PREFIX + f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        arg_default = af.default if af.default is not dataclasses.MISSING else af.default_factory()
        assert arg_default == default, f.name
        assert af.metadata["help"] == f.metadata["help"] and "%" not in af.metadata["help"]


def test_command_line_parsing_and_help(tmp_path):
    parser = HfArgumentParser(SAMTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--sam_variant", "asam", "--sam_rho", "0.5", "--sam_interval", "2",
         "--sam_perturb_exclude", "head", "bias", "--sam_same_dropout", "false"])
    cfg = args.sam_config
    assert (cfg.variant, cfg.rho, cfg.interval, cfg.same_dropout) == ("asam", 0.5, 2, False)
    assert cfg.perturb_exclude == ["head", "bias"] and cfg.effective_adaptive
    text = parser.format_help()
    assert "--sam_rho" in text and "--sam_variant" in text


def test_yaml_and_json_configs(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path), "sam_rho": 0.1, "sam_variant": "sam",
                                    "sam_rho_scaling": "none", "learning_rate": 0.01}))
    (args,) = HfArgumentParser(SAMTrainingArguments).parse_yaml_file(str(path))
    assert args.sam_config.rho == 0.1 and args.learning_rate == 0.01
    (args,) = HfArgumentParser(SAMTrainingArguments).parse_dict({"output_dir": str(tmp_path), "sam_eta": 0.2,
                                                                "sam_variant": "asam"})
    assert args.sam_config.eta == 0.2


@pytest.mark.parametrize("kwargs,words", [
    ({"variant": "nosuch"}, ["variant='nosuch'", "sam", "asam"]),
    ({"rho": -0.1}, ["rho=-0.1", ">= 0"]),
    ({"rho": math.nan}, ["rho=nan", "finite"]),
    ({"rho": math.inf}, ["rho=inf", "finite"]),
    ({"eta": -1.0}, ["eta=-1.0", ">= 0"]),
    ({"interval": 0}, ["interval=0", ">= 1"]),
    ({"perturb": "everything"}, ["perturb='everything'", "trainable", "lora", "norm"]),
    ({"rho_scaling": "mup2"}, ["rho_scaling='mup2'", "none", "mupp"]),
    ({"start": 0.8, "end": 0.5}, ["start=0.8", "end=0.5"]),
    ({"mupp_base_width": 64}, ["mupp_base_width", "rho_scaling"]),
    ({"rho_scaling": "mupp"}, ["mupp_base_width"]),
    ({"rho_scaling": "mupp", "mupp_base_width": 8, "mupp_roles": {"wte": "inputs"}}, ["mupp_roles", "input"]),
])
def test_bad_settings_are_refused_with_the_setting_and_allowed_values(kwargs, words):
    with pytest.raises(ValueError) as err:
        SAMConfig(**kwargs)
    for w in words:
        assert w in str(err.value)


def test_bad_arguments_fail_at_construction(tmp_path):
    with pytest.raises(ValueError, match="sam_rho|rho=-1"):
        SAMTrainingArguments(output_dir=str(tmp_path), sam_rho=-1.0, report_to=[])


def test_config_source_priority(tmp_path):
    plain = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    assert SAMTrainer(model=tiny.MLP(), args=plain).sam_config == SAMConfig()  # defaults: SAM, rho 0.05
    args = tiny.args(tmp_path, sam_rho=0.3)
    assert SAMTrainer(model=tiny.MLP(), args=args).sam_config.rho == 0.3
    # sam_config= with default sam_* arguments: the config is used
    assert SAMTrainer(model=tiny.MLP(), args=tiny.args(tmp_path), sam_config=SAMConfig(rho=0.7)).sam_config.rho == 0.7
    # both set: an error that names both sources (no silent winner)
    with pytest.raises(ValueError, match=r"sam_config=SAMConfig\(\.\.\.\) and the arguments' sam_rho=0\.3"):
        SAMTrainer(model=tiny.MLP(), args=args, sam_config=SAMConfig(rho=0.7))


@pytest.mark.parametrize("optim", ["lomo", "adalomo", "galore_adamw_layerwise"])
def test_optimizers_that_step_inside_backward_are_refused(tmp_path, optim):
    with pytest.raises(ValueError, match=optim):
        tiny.trainer(tmp_path, optim=optim)


def test_deepspeed_without_zero_1_or_2_and_fsdp1_are_refused(tmp_path):
    # (FSDP2 and ZeRO-1/2 run: tests/test_fsdp.py, tests/test_deepspeed.py)
    tr = tiny.trainer(tmp_path)
    tr.is_deepspeed_enabled = True  # no ZeRO stage in the (absent) DeepSpeed config
    with pytest.raises(ValueError, match="ZeRO stages 1 and 2"):
        tr._sam_check_supported()
    tr.is_deepspeed_enabled, tr.is_fsdp_enabled = False, True  # FSDP without fsdp_version 2
    with pytest.raises(ValueError, match="fsdp_version: 2"):
        tr._sam_check_supported()


def test_selection_that_leaves_nothing_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="no parameter"):
        tiny.trainer(tmp_path, sam_config=SAMConfig(perturb_include=["^nothing$"]))


def test_registry_is_open_to_users():
    from hf_sam import variants

    @variants.register("user_variant_test")
    def mine(ctx):
        ctx.grad(final=True)

    try:
        assert "user_variant_test" in variants.available()
        assert SAMConfig(variant="user_variant_test").variant == "user_variant_test"
        with pytest.raises(ValueError, match="already registered"):
            variants.register("user_variant_test")(mine)
    finally:
        variants.unregister("user_variant_test")


def test_model_init_is_supported(tmp_path):
    tr = SAMTrainer(model_init=lambda: tiny.MLP(), args=tiny.args(tmp_path, max_steps=2), train_dataset=tiny.Blobs())
    tr.train()
    assert tr.state.log_history[0]["sam/perturbation_norm"] > 0


@pytest.mark.parametrize("variant,name,value", [
    ("saf", "saf_lambda", 0.16), ("mesa", "saf_lambda", 0.3),
    ("frobsam", "universal_samples", 2), ("detsam", "universal_samples", 1), ("tracesam", "universal_samples", 1),
    ("frobsam", "universal_lambda", 0.005), ("detsam", "universal_lambda", 1.0), ("tracesam", "universal_lambda", 1.0),
])
def test_variant_defaults_are_filled_in(variant, name, value):
    cfg = SAMConfig(variant=variant)
    assert getattr(cfg, name) == value  # the number the step uses (official code / README values)
    assert name in cfg.resolved  # filled in, not given
    assert getattr(SAMConfig(variant=variant, **{name: 7}), name) == 7  # a given value is kept
    assert getattr(SAMConfig(), name) is None  # other variants leave it unset


def test_filled_in_defaults_follow_the_variant():
    saf = SAMConfig(variant="saf")
    assert saf.replace(variant="mesa").saf_lambda == 0.3
    assert saf.replace(variant="sam").saf_lambda is None  # no "setting of another variant" error
    assert SAMConfig(variant="saf", saf_lambda=0.5).replace(variant="mesa").saf_lambda == 0.5
    with pytest.raises(ValueError, match="saf_lambda is a setting of variant 'saf', 'mesa'"):
        SAMConfig(variant="sam", saf_lambda=0.16)  # a given value with another variant is still an error


def test_filled_in_defaults_stay_unset_in_the_arguments(tmp_path):
    args = SAMTrainingArguments(output_dir=str(tmp_path), sam_variant="mesa", report_to=[])
    assert args.sam_saf_lambda is None and args.sam_config.saf_lambda == 0.3
    args.sam_variant = "saf"  # e.g. a hyperparameter-search trial
    assert args.sam_config.saf_lambda == 0.16


def test_help_and_table_show_the_variant_defaults():
    from hf_sam.config import settings_markdown

    row = next(line for line in settings_markdown().splitlines() if "`--sam_saf_lambda`" in line)
    assert "`0.16` (saf), `0.3` (mesa)" in row and "0.16 for saf, 0.3 for mesa" in row


@pytest.mark.parametrize("name,value", [("interval", 1.5), ("interval", True), ("looksam_k", 2.0),
                                        ("saf_lag", 0), ("wasam_swa_interval", -1)])
def test_integer_settings_refuse_other_values(name, value):
    variant = {"looksam_k": "looksam", "saf_lag": "saf", "wasam_swa_interval": "wasam"}.get(name, "sam")
    with pytest.raises(ValueError, match=f"{name}=.*integer"):
        SAMConfig(variant=variant, **{name: value})
