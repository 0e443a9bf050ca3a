"""The README stays in sync with the code: settings table, the two set-up commands."""

import pathlib
import re

from hf_sam.config import settings_markdown
from hf_sam.variants import available

README = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_settings_table_matches_the_config():
    assert settings_markdown() in README


def test_exactly_two_setup_commands():
    setup = README.split("## Set up", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", setup, flags=re.S)
    assert len(commands) == 2
    assert "scripts/train_vit.py" in commands[0] and "pytest" in commands[1]


def test_every_registered_variant_is_documented():
    for name in available():
        assert f"`{name}`" in README, name
