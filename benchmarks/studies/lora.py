"""lora: LoRA fine-tuning of MiniLM (all-MiniLM-L6-v2, offline) on pydoc-sections, AdamW vs SAM.

scripts/train_text_cls.py with configs/lora_minilm_pydoc.yaml (SAM, perturb=lora: only the adapter
factors) and configs/lora_minilm_pydoc_trainable.yaml (perturb=trainable: adapters, the new head and
the pooler), and AdamW (the first config with rho 0). Test accuracy on the held-out 15%.
"""

from studies._report import fmt, mean_sd, status_note, table
from studies._subprocess import run_script

SEEDS = 3
PARTS = ("headline",)
CONFIGS = {
    "adamw": ["--config", "configs/lora_minilm_pydoc.yaml", "--sam_rho", "0"],
    "sam_perturb_lora": ["--config", "configs/lora_minilm_pydoc.yaml"],
    "sam_perturb_trainable": ["--config", "configs/lora_minilm_pydoc_trainable.yaml"],
}
QUICK = ["--max_steps", "2", "--max_train_samples", "32", "--max_eval_samples", "16", "--max_length", "32"]


def runs(parts, seeds, quick, cache):
    labels = ("sam_perturb_lora",) if quick else tuple(CONFIGS)
    return [dict(id=("quick_" if quick else "") + f"{label}_s{s}", part="headline", label=label, seed=s,
                 params=dict(flags=CONFIGS[label] + (QUICK if quick else []))) for label in labels for s in seeds]


def execute(run, quick):
    flags = [*run["params"]["flags"], "--seed", str(run["seed"]), "--eval_strategy", "no", "--logging_strategy", "no",
             "--torch_threads", "1"]
    results, state, wall = run_script("train_text_cls.py", flags)
    return {"test_accuracy": float(results["test_accuracy"]), "eval_accuracy": float(results["eval_accuracy"]),
            "steps": int(state["global_step"]), "train_runtime_s": float(results["train_runtime"]),
            "process_wall_s": wall}


def report(records, status, png, quick):
    got = {}
    for rec in records:
        got.setdefault(rec["label"], {})[rec["seed"]] = rec["result"]
    rows, summary = [], []
    for label, per_seed in got.items():
        acc = mean_sd([r["test_accuracy"] for r in per_seed.values()])
        rows.append([f"`{label}`", fmt(*acc, 100), len(per_seed)])
        summary.append(dict(label=label, test_accuracy=acc, seeds=sorted(per_seed)))
    md = ["# lora\n", __doc__.split("\n\n")[1].replace("\n", " ") + "\n",
          f"## test accuracy ({status_note(status, 'headline')})\n",
          table(["configuration", "test accuracy (%)", "seeds"], rows)]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, s in enumerate(summary):
        ax.errorbar(i, 100 * s["test_accuracy"][0], yerr=100 * s["test_accuracy"][1], fmt="o", capsize=3)
    ax.set_xticks(range(len(summary)), [s["label"] for s in summary], fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("lora: MiniLM LoRA on pydoc-sections")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return summary, "\n".join(md)
