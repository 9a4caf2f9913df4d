"""Node TOML files: the examples load as documented; a typo is a ConfigError naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2pfl.cli.config_file import load_daemon_config
from p2pfl.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[2] / "examples" / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.toml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_example_configs_load(path: Path) -> None:
    config = load_daemon_config(path)
    assert config.node.network_id


def test_the_documented_reputation_settings_reach_the_node(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    text = (CONFIGS / "node.toml").read_text().replace("drop_after = 10", "drop_after = 0")
    path.write_text(text)
    assert load_daemon_config(path).node.reputation.drop_after == 0


def test_a_misspelt_reputation_key_names_the_section_and_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text('[node]\nnetwork_id = "x"\nkey_file = "k.pem"\n[reputation]\ndrop_afer = 3\n')
    with pytest.raises(ConfigError, match=r"unknown key 'drop_afer' in \[reputation\]; did you mean 'drop_after'"):
        load_daemon_config(path)
