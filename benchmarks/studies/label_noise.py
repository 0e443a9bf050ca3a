"""label_noise: which SAM variant pays for itself under label noise, against a *tuned* AdamW, and at what cost.

The protocol (benchmarks/README.md) on three model families, 40% symmetric label noise on the training
data (train and validation), clean test labels:
  mlp     the digits MLP (64-256-256-10, studies/digits.py, in process), every registered variant
          (Flat-LoRA needs LoRA: it runs in the lora family) and SAM's interval / late-phase forms
  vit     the default tiny ViT job on digits (scripts/train_vit.py --label_noise), a subset of variants
  lora    MiniLM LoRA text classification on pydoc-sections (scripts/train_text_cls.py --label_noise,
          sam_perturb lora; the first 400 training paragraphs, 32 tokens), adamw and sam; and (part
          lora_cheap) the one-pass variants flat_lora and msam
  noise_sweep   the MLP at 0/20/60% noise: adamw, sam and the MLP's best cheap variant, same protocol

Per family, every method gets the same protocol on validation data carved from the *noisy* training
data (no clean label is used for any choice):
  1. the epoch: best checkpoint by noisy validation accuracy (ties to the lower validation loss; the
     scripts: Trainer's load_best_model_at_end, metric accuracy);
  2. AdamW: a learning rate x weight decay grid (FAMILIES[f]["grid"]), on the tuning seeds;
  3. each SAM-family method: its strength knob (rho, or rwp_gamma / saf_lambda for the variants without a
     radius) on a grid of multiples of its paper default, at AdamW's selected learning rate and weight decay;
     SAM itself then also gets AdamW's lr x wd grid at its selected rho (the reference "tuned SAM");
  4. the selected configuration (and the paper default, when it differs) is reported on 3 seeds; the tuning
     seeds are among them (the test split is never used for a choice). Gains are paired per seed.
Cost: wall time of the whole training loop (the scripts: train_runtime less the per-epoch evaluations;
the MLP: the loop less its per-epoch scoring), relative to AdamW on the same seed, median over the 3
seeds; process CPU time as a check (MLP); passes per step counted by hooks (MLP) or from the Trainer's
FLOP count relative to AdamW's (the scripts, which multiply by the passes each step ran).
"""

import math
import os
import statistics

from studies._report import fmt, mean_sd, table

SEEDS = 3
PARTS = ("mlp", "vit", "lora", "lora_cheap", "noise_sweep")
NOISE = 0.4
NOISE_LEVELS = (0.0, 0.2, 0.6)
KEEP, MAX_COST = 0.9, 1.2
CHEAP_PASSES = 1.2  # "cheap": at most this many backward passes per optimizer step

# Paper defaults of the strength knob (hf_sam's defaults, documented in each variant's module); rho 0.05 otherwise.
DEFAULT_KNOB = {"asam": ("rho", 0.5), "msam": ("rho", 1.0), "rwp": ("rwp_gamma", 0.01),
                "saf": ("saf_lambda", 0.16), "mesa": ("saf_lambda", 0.3)}
# flat_lora perturbs LoRA factors (it runs in the lora family); bsam is its own Adam-like optimizer and needs plain
# SGD as the base (hf_sam refuses it on AdamW), so it is not part of an AdamW-based comparison.
NOT_ON_ADAMW = ("flat_lora", "bsam")
FORMS = {"sam_interval2": dict(variant="sam", interval=2), "sam_interval5": dict(variant="sam", interval=5),
         "sam_late0.5": dict(variant="sam", start=0.5)}

FAMILIES = {
    "mlp": dict(epochs=30, val_fraction=0.2, tune_seeds=(0, 1), factors=(1 / 3, 1, 3, 10),
                grid=[(lr, wd) for lr in (3e-4, 1e-3, 3e-3) for wd in (0.0, 0.05, 0.5)], retune_sam=True,
                defaults=True),
    "vit": dict(epochs=20, tune_seeds=(0,), factors=(1 / 3, 1, 3),
                grid=[(lr, wd) for lr in (1e-3, 2e-3, 4e-3) for wd in (0.05, 0.5)], retune_sam=False,
                methods=("sam", "msam", "looksam")),
    "lora": dict(epochs=3, tune_seeds=(0,), factors=(1, 3), grid=[(1e-3, 0.01), (3e-3, 0.01)], retune_sam=False,
                 methods=("sam",)),
    # the one-pass variants on the LoRA task, a part of their own so that a second worker can run it
    "lora_cheap": dict(epochs=3, tune_seeds=(0,), factors=(1, 3), grid=None, retune_sam=False,
                       methods=("flat_lora", "msam"), base_family="lora"),
}
# the noise sweep: the MLP's protocol with one tuning seed and SAM's rho tuned at AdamW's lr and wd (budget)
FAMILIES["mlp_sweep"] = dict(FAMILIES["mlp"], tune_seeds=(0,), retune_sam=False, base_family="mlp")
VIT_FLAGS = ["--config", "configs/vit_digits.yaml", "--torch_threads", "1"]
# the first 400 training paragraphs (of about 820; validation and test, about 176 each, stay whole), 32 tokens:
# a run takes 2-4 minutes on a loaded core (the full size took 9)
LORA_FLAGS = ["--config", "configs/lora_minilm_pydoc.yaml", "--max_length", "32", "--max_train_samples", "400",
              "--torch_threads", "1"]
BEST_CKPT = ["--eval_strategy", "epoch", "--save_strategy", "epoch", "--save_total_limit", "1",
             "--load_best_model_at_end", "true", "--metric_for_best_model", "accuracy", "--logging_strategy", "epoch"]


def mlp_methods():
    from hf_sam.variants import available

    return [v for v in available() if v not in NOT_ON_ADAMW] + list(FORMS)


def knob(method):
    return DEFAULT_KNOB.get(method, ("rho", 0.05))


def sam_config(method, value):
    """SAMConfig kwargs of `method` with its knob at `value` (None: AdamW, the stock step)."""
    if method == "adamw":
        return None
    cfg = dict(FORMS.get(method, {"variant": method}))
    if method == "flat_lora":  # it perturbs the merged LoRA weights itself: the lora config's perturb=lora is refused
        cfg["perturb"] = "trainable"
    name, _ = knob(method)
    cfg[name] = value
    return cfg


def _num(x):
    return f"{x:.3g}"


def _run(part, family, method, value, lr, wd, seed, noise, stage):
    tag = "" if noise == NOISE else f"_noise{noise}"
    name = "" if method == "adamw" else f"_{knob(method)[0]}{_num(value)}"
    label = f"{family}{tag}_{method}{name}_lr{_num(lr)}_wd{_num(wd)}"
    return dict(id=f"{label}_s{seed}", part=part, label=label, seed=seed,
                params=dict(family=family, method=method, value=value, lr=lr, wd=wd, noise=noise, stage=stage,
                            epochs=FAMILIES[family]["epochs"]))


def _score(cache, runs):
    """Mean validation accuracy (best checkpoint) over the runs, or None while one is missing."""
    got = [cache[r["id"]]["result"] for r in runs if r["id"] in cache]
    if len(got) < len(runs):
        return None
    return statistics.fmean(g["val_acc_best"] for g in got)


def _select(cache, candidates):
    """candidates: [(key, [runs])] -> the key with the best mean validation accuracy, or None if incomplete."""
    scores = [(_score(cache, runs), i, key) for i, (key, runs) in enumerate(candidates)]
    if any(s is None for s, _, _ in scores):
        return None
    return max(scores, key=lambda t: (t[0], -t[1]))[2]  # ties: the earlier (smaller) grid point


def plan_family(part, family, methods, noise, seeds, cache, base=None):
    """The runs of one family in order: tuning (AdamW's grid, then every method's knob grid, then SAM's
    lr x wd at its rho), then the reports seed-major. Returns (runs, selection)."""
    spec = FAMILIES[family]
    tune = [s for s in seeds if s in spec["tune_seeds"]] or seeds[:1]
    run = lambda m, v, lr, wd, s, stage: _run(part, spec.get("base_family", family), m, v, lr, wd, s,  # noqa: E731
                                               noise, stage)
    tuning, reports, selection = [], [], {}
    given_base = base is not None
    if base is None:
        grid = [((lr, wd), [run("adamw", None, lr, wd, s, "tune") for s in tune]) for lr, wd in spec["grid"]]
        tuning += [r for _, rs in grid for r in rs]
        base = _select(cache, grid)
    if base is None:
        return tuning, selection
    selection["adamw"] = dict(lr=base[0], wd=base[1], value=None, default=None)
    for method in methods:
        name, default = knob(method)
        grid = [(default * f, [run(method, default * f, *base, s, "tune") for s in tune]) for f in spec["factors"]]
        tuning += [r for _, rs in grid for r in rs]
        value = _select(cache, grid)
        if value is None:
            continue
        lr, wd = base
        if method == "sam" and spec["retune_sam"]:
            grid = [((lr_, wd_), [run(method, value, lr_, wd_, s, "tune") for s in tune]) for lr_, wd_ in spec["grid"]]
            tuning += [r for _, rs in grid for r in rs]
            chosen = _select(cache, grid)
            if chosen is None:
                continue
            lr, wd = chosen
        selection[method] = dict(lr=lr, wd=wd, value=value, default=default, knob=name)
    owned = {m: sel for m, sel in selection.items() if m != "adamw" or not given_base}  # a given base is run elsewhere
    for s in seeds:  # seed-major: every method's run of a seed before the next seed's
        for method, sel in owned.items():
            reports.append(run(method, sel["value"], sel["lr"], sel["wd"], s, "report"))
            if spec.get("defaults") and sel["default"] is not None and not math.isclose(sel["value"], sel["default"]):
                reports.append(run(method, sel["default"], *base, s, "default"))
    return _unique(tuning + reports), selection


def _unique(runs):
    seen, out = set(), []
    for r in runs:
        if r["id"] not in seen:
            seen.add(r["id"])
            out.append(r)
    return out


def runs(parts, seeds, quick, cache):
    if quick:
        out = [_run("mlp", "mlp", m, v, 1e-3, 0.0, s, NOISE, "report")
               for m, v in (("adamw", None), ("sam", 0.05)) for s in seeds]
        for r in out:
            r["params"]["epochs"] = 2
        return out
    out = []
    if "mlp" in parts:
        out += plan_family("mlp", "mlp", mlp_methods(), NOISE, seeds, cache)[0]
    if "vit" in parts:
        out += plan_family("vit", "vit", FAMILIES["vit"]["methods"], NOISE, seeds, cache)[0]
    if "lora" in parts:
        out += plan_family("lora", "lora", FAMILIES["lora"]["methods"], NOISE, seeds, cache)[0]
    if "lora_cheap" in parts:  # its own part, so that a second worker can run it beside "lora"
        base = plan_family("lora", "lora", (), NOISE, seeds, cache)[1].get("adamw")
        if base is not None:
            out += plan_family("lora_cheap", "lora_cheap", FAMILIES["lora_cheap"]["methods"], NOISE, seeds, cache,
                               base=(base["lr"], base["wd"]))[0]
    if "noise_sweep" in parts:
        cheap = best_cheap(cache, seeds)
        if cheap is not None:
            for noise in NOISE_LEVELS:
                out += plan_family("noise_sweep", "mlp_sweep", ["sam", cheap], noise, seeds, cache)[0]
    return out


def execute(run, quick):
    p = run["params"]
    family = p["family"]
    cfg = sam_config(p["method"], p["value"])
    if family == "mlp":
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        import torch

        from studies.digits import train_mlp

        torch.set_num_threads(1)
        return train_mlp(cfg, noise=p["noise"], seed=run["seed"], epochs=p["epochs"], lr=p["lr"],
                         weight_decay=p["wd"], val_fraction=FAMILIES["mlp"]["val_fraction"])
    from studies._subprocess import run_script

    script, flags = ("train_vit.py", VIT_FLAGS) if family == "vit" else ("train_text_cls.py", LORA_FLAGS)
    flags = [*flags, *BEST_CKPT, *sam_flags(cfg), "--learning_rate", str(p["lr"]), "--weight_decay", str(p["wd"]),
             "--num_train_epochs", str(p["epochs"]), "--seed", str(run["seed"]), "--label_noise", str(p["noise"]),
             "--label_noise_seed", str(run["seed"])]
    results, state, wall = run_script(script, flags)
    evals = [h for h in state["log_history"] if "eval_accuracy" in h]
    eval_s = sum(h.get("eval_runtime", 0.0) for h in evals)
    best = max(evals, key=lambda h: (h["eval_accuracy"], -h["eval_loss"]))
    return {"test_acc_best": float(results["test_accuracy"]), "val_acc_best": float(results["eval_accuracy"]),
            "val_loss_best": float(best["eval_loss"]), "best_epoch": round(best["epoch"]),
            "steps": int(state["global_step"]), "train_wall_s": float(results["train_runtime"]) - eval_s,
            "eval_s": eval_s, "total_flos": float(state.get("total_flos", 0.0)), "process_wall_s": wall,
            "curve": {"val_acc": [round(h["eval_accuracy"], 5) for h in evals]}}


def sam_flags(cfg):
    if cfg is None:
        return ["--sam_rho", "0"]
    return [x for k, v in cfg.items() for x in (f"--sam_{k}", str(v))]


# ---- report ------------------------------------------------------------------------------------------
def family_rows(cache, part, family, methods, noise, seeds, base=None):
    """One row per method of a family: its selection, clean test accuracy at the best checkpoint (selected and
    paper-default configuration), gains paired per seed against tuned AdamW, cost."""
    _, selection = plan_family(part, family, methods, noise, seeds, cache, base=base)
    if "adamw" not in selection:
        return [], selection
    ref = FAMILIES[family].get("base_family", family)
    adamw = selection["adamw"]

    def results(method, value, lr, wd):
        return {s: cache[r["id"]]["result"] for s in seeds
                if (r := _run(part, ref, method, value, lr, wd, s, noise, "report"))["id"] in cache}

    base_runs = results("adamw", None, adamw["lr"], adamw["wd"])
    rows = []
    for method, sel in selection.items():
        row = dict(method=method, selected=sel)
        configs = {"report": (sel["value"], sel["lr"], sel["wd"])}
        if FAMILIES[family].get("defaults") and sel["default"] is not None and not math.isclose(sel["value"],
                                                                                                 sel["default"]):
            configs["default"] = (sel["default"], adamw["lr"], adamw["wd"])
        for stage, (value, lr, wd) in configs.items():
            res = results(method, value, lr, wd)
            done = [s for s in seeds if s in res and s in base_runs]
            ratio = lambda key: (statistics.median(res[s][key] / base_runs[s][key] for s in done)  # noqa: E731
                                 if done and key in res[done[0]] else None)
            row[stage] = dict(
                n=len(done), acc=mean_sd([res[s]["test_acc_best"] for s in done]),
                gain=mean_sd([res[s]["test_acc_best"] - base_runs[s]["test_acc_best"] for s in done]),
                wall=ratio("train_wall_s"), cpu=ratio("train_cpu_s"), passes=_passes(res, base_runs, done),
                best_epoch=mean_sd([res[s]["best_epoch"] for s in done])[0],
                memorised=mean_sd([res[s].get("memorised_noisy_labels") for s in done])[0])
        rows.append(row)
    sam = next((r for r in rows if r["method"] == "sam"), None)
    sam_gain = sam["report"]["gain"][0] if sam and sam["report"]["n"] else None
    for r in rows:
        rep = r["report"]
        # a share of SAM's gain means something only where tuned SAM gains over tuned AdamW
        r["share"] = rep["gain"][0] / sam_gain if sam_gain is not None and sam_gain > 0 and rep["n"] else None
        r["keeps"] = bool(r["method"] not in ("adamw", "sam") and r["share"] is not None and r["share"] >= KEEP
                          and rep["wall"] is not None and rep["wall"] <= MAX_COST)
    rows.sort(key=lambda r: -(r["report"]["gain"][0] if r["report"]["n"] else -1))
    return rows, selection


def _passes(res, base_runs, done):
    if not done:
        return None
    first = res[done[0]]
    if "backwards_per_step" in first:
        return statistics.fmean(res[s]["backwards_per_step"] for s in done)
    if base_runs[done[0]].get("total_flos"):
        return statistics.fmean(res[s]["total_flos"] / base_runs[s]["total_flos"] for s in done)
    return None


def best_cheap(cache, seeds):
    """The MLP method with the highest mean gain among those with <= CHEAP_PASSES backward passes per step."""
    rows, _ = family_rows(cache, "mlp", "mlp", mlp_methods(), NOISE, seeds)
    cheap = [r for r in rows if r["method"] not in ("adamw", "sam") and r["report"]["n"] == len(seeds)
             and r["report"]["passes"] is not None and r["report"]["passes"] <= CHEAP_PASSES]
    if not rows or any(r["report"]["n"] < len(seeds) for r in rows):
        return None
    return max(cheap, key=lambda r: r["report"]["gain"][0])["method"] if cheap else None


def _selected(sel):
    lr_wd = f"lr {_num(sel['lr'])}, wd {_num(sel['wd'])}"
    if sel["value"] is None:
        return lr_wd
    return f"{sel['knob']} {_num(sel['value'])} (default {_num(sel['default'])}), {lr_wd}"


def _family_table(rows, with_cpu):
    head = ["method", "selected on noisy validation", "clean test acc (%)", "gain vs tuned AdamW (pp)",
            "share of tuned SAM's gain", "gain at paper default (pp)", "wall time vs AdamW"]
    head += (["CPU time vs AdamW"] if with_cpu else []) + ["passes per step", "best epoch",
                                                          ">= 90% of SAM's gain at <= 1.2x wall time"]
    body = []
    for r in rows:
        rep = r["report"]
        sel = r["selected"]
        at_default = sel["default"] is not None and math.isclose(sel["value"], sel["default"])
        dft = r.get("default") or (rep if at_default else None)
        if not rep["n"]:
            continue
        body.append([f"`{r['method']}`", _selected(r["selected"]), fmt(*rep["acc"], 100), fmt(*rep["gain"], 100),
                     "-" if r["share"] is None or r["method"] in ("adamw", "sam") else f"{100 * r['share']:.0f}%",
                     "-" if r["method"] == "adamw" or dft is None else fmt(*dft["gain"], 100),
                     f"{rep['wall']:.2f}x"] + ([f"{rep['cpu']:.2f}x" if rep["cpu"] else "-"] if with_cpu else []) +
                    ["-" if rep["passes"] is None else f"{rep['passes']:.2f}", f"{rep['best_epoch']:.1f}",
                     "-" if r["method"] in ("adamw", "sam") else ("**yes**" if r["keeps"] else "no")])
    return table(head, body)


def report(records, status, png, quick):
    cache = {r["id"]: r for r in records}
    seeds = list(range(SEEDS))
    if quick:
        got = {r["params"]["method"]: r["result"] for r in records}
        rows = [[f"`{m}`", f"{100 * g['test_acc_best']:.1f}", g["best_epoch"], f"{g['backwards_per_step']:.2f}"]
                for m, g in got.items()]
        _plot({}, png)
        return ({"quick": {m: g["test_acc_best"] for m, g in got.items()}},
                "# label_noise\n\nA smoke run (--quick): 2 epochs, no tuning.\n\n" +
                table(["method", "test acc (%)", "best epoch", "backward passes per step"], rows))
    md = ["# label_noise\n", __doc__.split("\n\n")[1].replace("\n", " ") + "\n",
          "Reproduce: `python benchmarks/run.py label_noise --parts mlp vit lora lora_cheap noise_sweep` "
          "(resumes from benchmarks/results/cache/label_noise/).\n"]
    summary, plotted = {}, {}
    titles = {"mlp": "digits MLP (64-256-256-10), 30 epochs", "vit": "tiny ViT on digits (the default job), 20 epochs",
              "lora": "MiniLM LoRA on pydoc-sections (400 training paragraphs, max_length 32), 3 epochs"}
    for family in ("mlp", "vit", "lora"):
        methods = mlp_methods() if family == "mlp" else list(FAMILIES[family]["methods"])
        rows, selection = family_rows(cache, family, family, methods, NOISE, seeds)
        if family == "lora" and "adamw" in selection:
            extra, _ = family_rows(cache, "lora_cheap", "lora_cheap", FAMILIES["lora_cheap"]["methods"], NOISE,
                                   seeds, base=(selection["adamw"]["lr"], selection["adamw"]["wd"]))
            rows += [r for r in extra if r["method"] != "adamw"]
            rows.sort(key=lambda r: -(r["report"]["gain"][0] if r["report"]["n"] else -1))
        if not rows:
            md.append(f"\n## {family}: tuning not finished\n")
            continue
        md += [f"\n## {titles[family]}, {int(NOISE * 100)}% noise\n", _family_table(rows, family == "mlp")]
        summary[family] = rows
        plotted[family] = rows
    sweep = []
    cheap = best_cheap(cache, seeds)
    for noise in NOISE_LEVELS:
        if cheap is None:
            break
        rows, _ = family_rows(cache, "noise_sweep", "mlp_sweep", ["sam", cheap], noise, seeds)
        for r in rows:
            if r["report"]["n"]:
                sweep.append([f"{int(noise * 100)}%", f"`{r['method']}`", _selected(r["selected"]),
                              fmt(*r["report"]["acc"], 100), fmt(*r["report"]["gain"], 100)])
    if sweep:
        for r in summary.get("mlp", []):
            if r["method"] in ("adamw", "sam", cheap) and r["report"]["n"]:
                sweep.append([f"{int(NOISE * 100)}%", f"`{r['method']}`", _selected(r["selected"]),
                              fmt(*r["report"]["acc"], 100), fmt(*r["report"]["gain"], 100)])
        sweep.sort(key=lambda row: int(row[0][:-1]))
        md += [f"\n## MLP noise sweep (adamw, sam and the best cheap variant, `{cheap}`)\n",
               table(["noise", "method", "selected", "clean test acc (%)", "gain vs tuned AdamW (pp)"], sweep)]
        summary["noise_sweep"] = sweep
    _plot(plotted, png)
    return _jsonable(summary), "\n".join(md)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _plot(plotted, png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, max(len(plotted), 1), figsize=(6.5 * max(len(plotted), 1), 5.2), squeeze=False)
    for ax, (family, rows) in zip(axes[0], plotted.items()):
        sam = next((r for r in rows if r["method"] == "sam"), None)
        for r in rows:
            rep = r["report"]
            if not rep["n"]:
                continue
            color = "k" if r["method"] == "adamw" else ("tab:red" if r["method"] == "sam" else "tab:blue")
            ax.errorbar(rep["wall"], 100 * rep["gain"][0], yerr=100 * rep["gain"][1], fmt="o", color=color, ms=5,
                        capsize=2)
            ax.annotate(r["method"], (rep["wall"], 100 * rep["gain"][0]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        ax.axhline(0, color="grey", lw=0.8)
        ax.axvline(MAX_COST, color="grey", lw=0.8, ls="--")
        if sam is not None and sam["report"]["n"]:
            ax.axhline(100 * KEEP * sam["report"]["gain"][0], color="tab:red", lw=0.8, ls=":")
        ax.set_title(family)
        ax.set_xlabel("wall time of the training loop relative to tuned AdamW")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("clean test accuracy gain over tuned AdamW (pp, mean ± sd, 3 seeds)")
    fig.suptitle(f"label_noise, {int(NOISE * 100)}% noise: gain vs cost, every method tuned on noisy validation data "
                 "(dotted: 90% of tuned SAM's gain; dashed: 1.2x)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
