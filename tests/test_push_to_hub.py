"""`--push_to_hub` end to end against a fake Hub API: no network.

`transformers.trainer` calls `hf_api().create_repo(...)` (from `__init__` when args.push_to_hub) and
`hf_api().upload_folder(...)` (after every save with hub_strategy=every_save, with
run_as_future=True, and at the end from `push_to_hub`). The fake records the calls and copies the
README.md it is asked to upload, so the card that would reach the Hub can be checked.
"""

import os
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from scripts import train_vit  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


class FakeHubApi:
    def __init__(self, user="hf-sam-tester"):
        self.user = user
        self.created, self.uploads = [], []

    def create_repo(self, repo_id, token=None, private=None, exist_ok=False, **kwargs):
        full_id = repo_id if "/" in repo_id else f"{self.user}/{repo_id}"
        self.created.append({"repo_id": full_id, "private": private, "exist_ok": exist_ok})
        return SimpleNamespace(repo_id=full_id, url=f"https://hub.invalid/{full_id}")

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        card = folder / "README.md"
        self.uploads.append({**kwargs, "files": sorted(p.name for p in folder.iterdir()),
                             "readme": card.read_text() if card.is_file() else None})
        result = SimpleNamespace(commit_url=f"https://hub.invalid/{kwargs['repo_id']}/commit/{len(self.uploads)}")
        if kwargs.get("run_as_future"):
            future = Future()
            future.set_result(result)
            return future
        return result


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub.constants
    import transformers.trainer

    api = FakeHubApi()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # any real request would fail
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: api)
    return api


def test_push_to_hub_uploads_the_sam_model_card(tmp_path, fake_hub):
    from huggingface_hub import ModelCard

    out = tmp_path / "tiny-vit-asam"
    trainer, metrics = train_vit.run([
        "--config", str(REPO / "configs" / "vit_digits.yaml"), "--output_dir", str(out),
        "--sam_variant", "asam", "--sam_rho", "0.5",
        "--push_to_hub", "true", "--hub_model_id", "hf-sam-tester/tiny-vit-asam",
        "--max_steps", "4", "--max_train_samples", "64", "--max_eval_samples", "32", "--logging_steps", "2",
        "--eval_strategy", "steps", "--eval_steps", "2", "--save_strategy", "steps", "--save_steps", "2",
        "--torch_threads", "1"])

    # the repository is created once, up front, with the id asked for
    assert [c["repo_id"] for c in fake_hub.created] == ["hf-sam-tester/tiny-vit-asam"]
    # checkpoints were pushed in the background during training, the final folder at the end
    assert len(fake_hub.uploads) >= 2
    assert all(u["run_as_future"] for u in fake_hub.uploads[:-1])
    final = fake_hub.uploads[-1]
    assert final["repo_id"] == "hf-sam-tester/tiny-vit-asam" and final["folder_path"] == str(out)
    assert not final["run_as_future"]
    assert "checkpoint-*" in final["ignore_patterns"]
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "README.md"} <= set(final["files"])

    # the card that was uploaded: front matter ...
    card = ModelCard(final["readme"])
    assert {"sam", "hf-sam", "asam", "generated_from_trainer"} <= set(card.data.tags)
    assert card.data.library_name == "transformers"
    # ... and body: SAM settings, the command that reproduces the run, citations, quick start
    body = final["readme"]
    assert "# tiny-vit-asam" in body and "ASAM" in body
    assert "| `rho` | 0.5 |" in body and "| `variant` | asam |" in body
    assert "python scripts/train_vit.py --config" in body and "--sam_variant asam" in body
    assert "2010.01412" in body and "2102.11600" in body  # SAM and ASAM papers
    assert 'from_pretrained("hf-sam-tester/tiny-vit-asam")' in body
    assert (out / "README.md").read_text() == body  # the card on disk is the one uploaded
