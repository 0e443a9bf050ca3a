"""scripts/mupp_coord_check.py: runs on CPU at small widths and shows the muP^2 contrast."""

import importlib.util
import math
import pathlib

import pytest
import torch

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "mupp_coord_check.py"
SMALL = ["--widths", "32", "64", "128", "--base-width", "32", "--heads", "2", "--seeds", "1", "--vocab", "64",
         "--seq-len", "16", "--batch", "4"]


def load_script():
    spec = importlib.util.spec_from_file_location("mupp_coord_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return load_script()


@pytest.fixture(scope="module")
def mup_run(script):
    return script.main(SMALL + ["--parametrizations", "mup", "--no-plot"])


def test_table_and_slopes_show_the_mupp_contrast(mup_run):
    slopes_none = mup_run["results"][("mup", "none")]["slopes"]
    slopes_mupp = mup_run["results"][("mup", "mupp")]["slopes"]
    summary = mup_run["summary"]
    # plain SAM in muP: input-like layers fade fast, the readout grows
    assert slopes_none["transformer.wte"] < -1.0
    assert slopes_none["transformer.h.0.mlp.c_fc"] < -0.25
    assert slopes_none["lm_head"] > 0.4
    assert summary[("mup", "none")]["median_abs_slope_non_readout"] > 0.5
    # muP^2: flat-ish for the embeddings, the MLP and the readout
    for layer in ("transformer.wte", "transformer.wpe", "transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_proj",
                  "lm_head"):
        assert abs(slopes_mupp[layer]) < 0.25, (layer, slopes_mupp[layer])
    assert summary[("mup", "mupp")]["median_abs_slope_non_readout"] < 0.2


def test_at_base_width_both_rules_agree(mup_run):
    none = mup_run["results"][("mup", "none")]["effects"]
    mupp = mup_run["results"][("mup", "mupp")]["effects"]
    for layer in none:
        assert mupp[layer][0] == pytest.approx(none[layer][0], rel=1e-9), layer


def test_effect_of_the_embedding_is_the_rms_of_its_perturbed_rows(script):
    args = script.parse_args(SMALL)
    model = script.build_gpt2(32, args, "mup", 0)
    ids = script.fixed_batch(args)
    e = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    effects = script.layer_effects(model, ids, e)
    rows = e["transformer.wte.weight"][ids]
    assert effects["transformer.wte"] == pytest.approx(rows.double().pow(2).mean().sqrt().item(), rel=1e-6)
    # a Conv1D layer: x @ e_W + e_b with the layer's own input
    captured = {}
    def keep_input(module, args, out):
        captured["x"] = args[0]

    hook = model.transformer.h[0].mlp.c_fc.register_forward_hook(keep_input)
    with torch.no_grad():
        model(input_ids=ids)
    hook.remove()
    delta = captured["x"] @ e["transformer.h.0.mlp.c_fc.weight"] + e["transformer.h.0.mlp.c_fc.bias"]
    assert effects["transformer.h.0.mlp.c_fc"] == pytest.approx(delta.double().pow(2).mean().sqrt().item(), rel=1e-5)


def test_sam_perturbation_has_radius_rho_without_scaling(script):
    grads = [("a", torch.randn(3, 4)), ("b", torch.randn(5))]
    e = script.sam_perturbation(grads, 0.1, None)
    assert math.sqrt(sum(v.pow(2).sum().item() for v in e.values())) == pytest.approx(0.1, rel=1e-6)


def test_muP_model_is_built_in_muP(script):
    args = script.parse_args(SMALL)
    small, wide = script.build_gpt2(32, args, "mup", 0), script.build_gpt2(128, args, "mup", 0)
    sp_wide = script.build_gpt2(128, args, "sp", 0)
    # readout std ~ 1/width in muP (4x narrower at 4x the width), ~ 1/sqrt(width) in SP
    ratio = small.lm_head.weight.std().item() / wide.lm_head.weight.std().item()
    assert ratio == pytest.approx(4.0, rel=0.1)
    assert sp_wide.lm_head.weight.std().item() == pytest.approx(128 ** -0.5, rel=0.1)
    attn = wide.transformer.h[0].attn
    assert attn.scaling == pytest.approx((16 ** 0.5) / 64)  # 1/d_head, equal to 1/sqrt(d_head) at the base
    assert sp_wide.transformer.h[0].attn.scaling == pytest.approx(64 ** -0.5)


def test_cli_writes_the_plot_and_prints_the_table(script, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "cc.png"
    script.main(["--widths", "32", "64", "--base-width", "32", "--heads", "2", "--seeds", "1", "--vocab", "32",
                 "--seq-len", "8", "--batch", "2", "--out", str(out)])
    text = capsys.readouterr().out
    assert out.exists() and out.stat().st_size > 1000
    assert "SP (standard parametrization" in text and "rho_scaling=mupp" in text and "lm_head" in text
