"""Model cards: the stock Trainer's training summary plus how sharpness-aware training was set up.

Rendered from the Jinja template `model_cards/sam_model_card.md` (shipped as hf_sam.model_cards).
"""

import os
import re
import shlex
import sys
from importlib import resources

import jinja2
import yaml
from huggingface_hub import ModelCard
from transformers.modelcard import (
    TrainingSummary,
    extract_hyperparameters_from_trainer,
    make_markdown_table,
    parse_log_history,
)

from .config import is_secret_name

TEMPLATE = "sam_model_card.md"
REDACTED = "REDACTED"
_TOKEN_LIKE = re.compile(r"\b(hf_[A-Za-z0-9]{20,}|api_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_\-]{20,}|gh[pousr]_[A-Za-z0-9]{20,})")

MUPP_PAPER = {
    "title": "Effective Sharpness Aware Minimization Requires Layerwise Perturbation Scaling",
    "authors": "Moritz Haas, Jin Xu, Volkan Cevher, Leena Chennuru Vankadara",
    "venue": "NeurIPS 2024",
    "arxiv": "2411.00075",
    "bibtex": """@inproceedings{haas2024mupp,
  title={Effective Sharpness Aware Minimization Requires Layerwise Perturbation Scaling},
  author={Haas, Moritz and Xu, Jin and Cevher, Volkan and Vankadara, Leena Chennuru},
  booktitle={Advances in Neural Information Processing Systems},
  year={2024},
  url={https://arxiv.org/abs/2411.00075}
}""",
}


def _template() -> jinja2.Template:
    text = resources.files("hf_sam.model_cards").joinpath(TEMPLATE).read_text(encoding="utf-8")
    return jinja2.Environment(keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True).from_string(text)


def _papers(config):
    from .variants import get_variant
    from .variants.sam import SAM_PAPER

    papers = [SAM_PAPER]
    paper = get_variant(config.variant).paper
    if paper and paper.get("arxiv") != SAM_PAPER["arxiv"]:
        papers.append(paper)
    if config.rho_scaling == "mupp":
        papers.append(MUPP_PAPER)
    return papers


def _quick_start(model, repo_id: str) -> str:
    cls = type(model).__name__
    if cls.startswith("Peft"):
        return (f'from peft import AutoPeftModel\n\nmodel = AutoPeftModel.from_pretrained("{repo_id}")')
    if hasattr(model, "from_pretrained"):
        return f'from transformers import {cls}\n\nmodel = {cls}.from_pretrained("{repo_id}")'
    return (f"# {cls} is a plain torch module: rebuild it, then load the saved weights\n"
            "from safetensors.torch import load_file\n\n"
            f'model.load_state_dict(load_file("{repo_id}/model.safetensors"))')


def _round(value, digits=4):
    return round(value, digits) if isinstance(value, float) else value


def card_settings(config) -> list[tuple[str, object]]:
    """The settings that shape this run: the core ones, the variant's own, muP^2's when used (rho only for
    variants with a radius, or when it is 0: the stock step)."""
    import dataclasses

    from .variants import get_variant

    out = []
    no_radius = not get_variant(config.variant).uses_rho
    for f in dataclasses.fields(config):
        if f.name == "rho" and no_radius and config.rho != 0:  # rwp, saf, mesa: the default rho is not used
            continue
        used_by, when = f.metadata.get("used_by"), f.metadata.get("when")
        if used_by is not None and config.variant not in used_by:
            continue
        if when is not None and getattr(config, when[0]) not in when[1]:
            continue
        out.append((f.name, getattr(config, f.name)))
    return out


def _last_sam_metrics(log_history):
    for entry in reversed(log_history):
        found = [(k, _round(v, 6)) for k, v in entry.items() if k.startswith("sam/")]
        if found:
            return found
    return []


def redact_command(command: str | None) -> str | None:
    """`command` with the values of secret-bearing arguments replaced by REDACTED.

    Secret names: `hf_sam.config.is_secret_name` (hub_token, token, api_key, *_secret, password, ...), in every
    form: `--flag value`, `--flag=value`, `NAME=value` (environment assignments before the command, key=value
    overrides). Words that look like Hub, OpenAI or GitHub tokens (hf_..., sk-..., ghp_...) are redacted
    wherever they stand. A command that shlex cannot split is withheld entirely.
    """
    if not command:
        return command
    try:
        words = shlex.split(command)
    except ValueError:
        return "(command withheld: it could not be parsed to redact secrets)"
    out, hide_next = [], False
    for word in words:
        if hide_next and not word.startswith("-"):
            out.append(REDACTED)
            hide_next = False
            continue
        hide_next = False
        name, eq, _ = word.partition("=")
        if eq and is_secret_name(name.lstrip("-").rsplit(".", 1)[-1]):
            out.append(f"{name}={REDACTED}")
        elif word.startswith("-") and is_secret_name(word):
            out.append(word)
            hide_next = True
        else:
            out.append(_TOKEN_LIKE.sub(REDACTED, word))
    return shlex.join(out)


def _command(trainer) -> str | None:
    """The reproduce command shown in the card (redacted: whatever its source)."""
    if trainer.sam_reproduce_command:
        return redact_command(trainer.sam_reproduce_command)
    if sys.argv and sys.argv[0].endswith(".py"):
        return redact_command(shlex.join(["python", *sys.argv]))
    return None


def render_model_card(trainer, summary: TrainingSummary) -> str:
    """The card text for a trainer and its stock TrainingSummary (pure: no I/O)."""
    config = trainer.sam_config
    metadata = summary.create_metadata()
    metadata["tags"] = list(dict.fromkeys([*(metadata.get("tags") or []), *trainer.sam_tags()]))
    variant_title = config.variant.upper() if config.variant != "sam" else "SAM"
    if config.effective_adaptive and config.variant != "asam":
        variant_title += " (adaptive)"
    repo_id = trainer.args.hub_model_id or summary.model_name
    if summary.finetuned_from:
        origin = f"This model is a fine-tuned version of [{summary.finetuned_from}]" \
                 f"(https://huggingface.co/{summary.finetuned_from})."
    else:
        origin = "This model was trained from scratch."
    if summary.dataset:
        datasets = summary.dataset if isinstance(summary.dataset, (list, tuple)) else [summary.dataset]
        origin = origin[:-1] + f" on {', '.join(map(str, datasets))}."
    versions = [("hf_sam", _version("hf_sam")), ("Transformers", _version("transformers")),
                ("PyTorch", _version("torch")), ("Accelerate", _version("accelerate"))]
    return _template().render(
        front_matter=yaml.dump(metadata, sort_keys=False),
        model_name=summary.model_name,
        origin=origin,
        variant_title=variant_title,
        eval_results=[(k, _round(v)) for k, v in (summary.eval_results or {}).items()],
        quick_start=_quick_start(trainer.accelerator.unwrap_model(trainer.model), repo_id),
        ascent=_ascent(trainer),
        sam_settings=card_settings(config),
        sam_metrics=_last_sam_metrics(trainer.state.log_history),
        hyperparameters=list((summary.hyperparameters or {}).items()),
        results_table=make_markdown_table(summary.eval_lines) if summary.eval_lines else "",
        command=_command(trainer),
        versions=versions,
        papers=_papers(config),
    )


def _ascent(trainer) -> str:
    """Where the ascent gradient comes from: this device's micro-batch, or all processes' (global)."""
    if not trainer.sam_config.sync_ascent:
        return "and per device (m-sharpness with m = the per-device micro-batch size)"
    if trainer.sam_config.sync_ascent == "node":
        return "per node (HSDP: the mean over the shard group's micro-batches, sync_ascent='node')"
    sharding = getattr(trainer, "sam_sharding", None)
    why = ", the default under FSDP" if sharding is not None and sharding.sync_ascent_auto else ""
    return f"over the global batch (the micro-batches of all processes: sync_ascent=True{why})"


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


def _summary(trainer, **kwargs) -> TrainingSummary:
    """The stock TrainingSummary; for plain torch modules (no `.config`) built from the same parts."""
    if hasattr(trainer.model, "config"):
        return TrainingSummary.from_trainer(trainer, **kwargs)
    _, eval_lines, eval_results = parse_log_history(trainer.state.log_history)
    name = kwargs.get("model_name") or os.path.basename(os.path.normpath(trainer.args.output_dir))
    return TrainingSummary(model_name=name, language=kwargs.get("language"), license=kwargs.get("license"),
                           tags=["generated_from_trainer", *(kwargs.get("tags") or [])],
                           dataset=kwargs.get("dataset"), eval_results=eval_results, eval_lines=eval_lines,
                           hyperparameters=extract_hyperparameters_from_trainer(trainer))


def write_model_card(trainer, *, tags=None, **summary_kwargs) -> str:
    """Trainer.create_model_card's behaviour (existing tags kept, PEFT card updated) with the SAM card."""
    path = os.path.join(trainer.args.output_dir, "README.md")
    tags = [tags] if isinstance(tags, str) else list(tags or [])
    is_peft = False
    if os.path.exists(path):
        data = ModelCard.load(path).data
        is_peft = data.get("library_name") == "peft"
        tags += [t for t in (data.tags or []) if t not in tags]
    summary = _summary(trainer, tags=tags or None, **summary_kwargs)
    text = render_model_card(trainer, summary)
    os.makedirs(trainer.args.output_dir, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    if is_peft:
        trainer.accelerator.unwrap_model(trainer.model).create_or_update_model_card(trainer.args.output_dir)
    return path
