"""Run one of the project's training scripts in a child process and read back its metrics."""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_script(script, flags, timeout=3600):
    """python scripts/<script> [no checkpoints, no report, no bar] <flags> --output_dir <tmp>; returns (all_results.json, trainer_state.json, wall_s)."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", WANDB_DISABLED="true")
    with tempfile.TemporaryDirectory(prefix="hf_sam_bench_") as tmp:
        # the study's flags come after these defaults, so a study may save checkpoints (the best one by validation)
        cmd = [sys.executable, str(REPO / "scripts" / script), "--save_strategy", "no", "--report_to", "none",
               "--disable_tqdm", "true", *flags, "--output_dir", tmp]
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        wall = time.time() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        results = json.loads((Path(tmp) / "all_results.json").read_text())
        state = json.loads((Path(tmp) / "trainer_state.json").read_text())
    return results, state, wall
