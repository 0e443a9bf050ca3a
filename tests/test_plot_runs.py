"""scripts/plot_runs.py: a PNG of several runs' trainer_state.json, offline and without training."""

import json
import math
from pathlib import Path

import pytest

from scripts import plot_runs

REPO = Path(__file__).resolve().parents[1]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_run(folder, steps=10, accuracy=True, sharpness=True, in_checkpoint=False):
    """A trainer_state.json shaped like the Trainer's, with SAMTrainer's sam/* entries."""
    history = []
    for step in range(1, steps + 1):
        entry = {"step": step, "epoch": step / steps, "loss": 2.0 / step, "learning_rate": 1e-3}
        if sharpness:
            entry["sam/sharpness"] = 0.1 / step
        history.append(entry)
        if step % 5 == 0:
            evaluation = {"step": step, "epoch": step / steps, "eval_loss": 2.5 / step}
            if accuracy:
                evaluation["eval_accuracy"] = 1 - 1 / (step + 1)
            history.append(evaluation)
    target = folder / "checkpoint-10" if in_checkpoint else folder
    target.mkdir(parents=True, exist_ok=True)
    (target / "trainer_state.json").write_text(json.dumps({"global_step": steps, "log_history": history}))
    return folder


def test_plot_several_runs(tmp_path, capsys):
    sam = fake_run(tmp_path / "sam")
    plain = fake_run(tmp_path / "plain", sharpness=False, in_checkpoint=True)  # found through its checkpoint
    output = tmp_path / "plots" / "compare.png"
    plot_runs.main([str(sam), str(plain / "checkpoint-10" / "trainer_state.json"), "--output", str(output)])
    assert output.read_bytes()[:8] == PNG_MAGIC and output.stat().st_size > 10_000
    assert f"wrote {output}" in capsys.readouterr().out


def test_language_model_runs_get_perplexity_and_custom_labels(tmp_path):
    lm = fake_run(tmp_path / "lm", accuracy=False)
    output = plot_runs.plot_runs([lm, lm], tmp_path / "lm.png", labels=["rho 0.05", "again"], title="LM")
    assert output.read_bytes()[:8] == PNG_MAGIC
    history = json.loads((lm / "trainer_state.json").read_text())["log_history"]
    steps, perplexity = plot_runs.series(history, plot_runs.PERPLEXITY_PANEL[1])
    assert steps == [5, 10] and perplexity[0] == pytest.approx(math.exp(2.5 / 5))


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(SystemExit, match="neither a run folder"):
        plot_runs.main([str(tmp_path / "missing"), "--output", str(tmp_path / "x.png")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="holds no trainer_state.json"):
        plot_runs.main([str(tmp_path / "empty")])
    bad = tmp_path / "bad" / "trainer_state.json"
    bad.parent.mkdir()
    bad.write_text("{not json")
    with pytest.raises(SystemExit, match="cannot read"):
        plot_runs.main([str(bad)])
    with pytest.raises(SystemExit, match="2 labels for 1 runs"):
        plot_runs.plot_runs([fake_run(tmp_path / "ok")], tmp_path / "y.png", labels=["a", "b"])


def png_size(path):
    data = Path(path).read_bytes()
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_logged_sharpness_measurements_get_their_own_panels(tmp_path):
    plain = fake_run(tmp_path / "plain")
    measured = fake_run(tmp_path / "measured")
    state_file = measured / "trainer_state.json"
    state = json.loads(state_file.read_text())
    for step in (5, 10):  # what SharpnessCallback logs after each evaluation
        state["log_history"].append({"step": step, "sharpness/top_eigenvalue": 40.0 / step,
                                     "sharpness/m_sharpness": 0.2 / step, "sharpness/trace": 900.0 / step})
    state_file.write_text(json.dumps(state))
    history = plot_runs.load_history(state_file)
    panels = plot_runs.sharpness_panels([plot_runs.load_history(plain / "trainer_state.json"), history])
    assert [name for name, _ in panels] == ["sharpness/m_sharpness", "sharpness/top_eigenvalue", "sharpness/trace"]
    assert plot_runs.series(history, panels[1][1]) == ([5, 10], [8.0, 4.0])
    base = plot_runs.plot_runs([plain], tmp_path / "base.png")
    both = plot_runs.plot_runs([plain, measured], tmp_path / "both.png")
    (w0, h0), (w1, h1) = png_size(base), png_size(both)
    assert w1 == w0 and h1 == pytest.approx(h0 * 4 / 2, rel=0.02)  # 2 more rows of panels (7 panels)
