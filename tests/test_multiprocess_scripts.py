"""Two processes on the CPU: `accelerate launch --config_file configs/accelerate/multi_cpu.yaml`.

The launched program is scripts/train_vit.py's `main` behind a small wrapper that, after training,
writes what each rank ended with: its rank, the world size, the step count and a hash of its
final weights. Both ranks must have trained the same number of steps in one gloo group and
hold bit-identical weights (DDP all-reduces the descent gradient; the SAM ascent is per device).
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

WRAPPER = """
import hashlib, json, sys
from scripts.train_vit import run

trainer, metrics = run(sys.argv[2:])
weights = hashlib.sha256()
for name, tensor in sorted(trainer.accelerator.unwrap_model(trainer.model).state_dict().items()):
    weights.update(name.encode())
    weights.update(tensor.detach().cpu().contiguous().numpy().tobytes())
rank = trainer.args.process_index
report = {{"rank": rank, "world_size": trainer.args.world_size, "global_step": trainer.state.global_step,
          "distributed_type": str(trainer.accelerator.distributed_type), "weights": weights.hexdigest(),
          "sharpness_logged": any("sam/sharpness" in e for e in trainer.state.log_history)}}
with open(f"{{sys.argv[1]}}/rank{{rank}}.json", "w") as f:
    json.dump(report, f)
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_cpu_processes_train_one_model(tmp_path):
    wrapper = tmp_path / "launch_vit.py"
    wrapper.write_text(WRAPPER.format())
    reports = tmp_path / "reports"
    reports.mkdir()
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO / "configs" / "accelerate" / "multi_cpu.yaml"),
        "--main_process_port", str(free_port()),
        str(wrapper), str(reports),
        "--config", str(REPO / "configs" / "vit_digits.yaml"), "--use_cpu", "true",
        "--output_dir", str(tmp_path / "out"), "--max_steps", "4", "--max_train_samples", "64",
        "--max_eval_samples", "32", "--per_device_train_batch_size", "8", "--logging_steps", "2",
        "--eval_strategy", "no", "--save_strategy", "no", "--torch_threads", "1",
    ]
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])  # `scripts` and this checkout
    env = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]

    ranks = [json.loads((reports / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank, report in enumerate(ranks):
        assert report["rank"] == rank and report["world_size"] == 2, report
        assert report["distributed_type"].endswith("MULTI_CPU"), report
        assert report["global_step"] == 4 and report["sharpness_logged"], report
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert (tmp_path / "out" / "README.md").is_file()  # written once, by rank 0
    assert result.stdout.count("test accuracy:") == 1  # printed by rank 0 only
