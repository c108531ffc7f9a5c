"""Unit tests of configuration loading and the restart policy."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import RestartPolicy, load_config
from agent.errors import StartupError


def test_backoff_first_failure_is_immediate_then_doubles_capped() -> None:
    policy = RestartPolicy(backoff_initial=0.25, backoff_max=2.0)
    assert [policy.backoff(n) for n in range(1, 7)] == [0.0, 0.25, 0.5, 1.0, 2.0, 2.0]


def test_load_config_file_and_overrides(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('reconnect_delay = 12\nallowed_plugins = ["file"]\n'
                   "[restart]\nmax_failures = 3\n")
    config = load_config(cfg, qmp_path="/q", control_path=Path("/c"), runtime_dir="/r",
                         health_interval=None)
    assert config.reconnect_delay == 12
    assert config.allowed_plugins == frozenset({"file"})
    assert config.restart.max_failures == 3 and config.restart.window == 60.0
    assert config.qmp_path == Path("/q") and config.health_interval == 5.0


@pytest.mark.parametrize("text", ["bogus = 1\n", "[restart]\nnope = 1\n", "x = = 1"])
def test_load_config_rejects_bad_files(tmp_path: Path, text: str) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    with pytest.raises(StartupError):
        load_config(cfg, qmp_path="/q", control_path="/c", runtime_dir="/r")


def test_load_config_missing_file(tmp_path: Path) -> None:
    with pytest.raises(StartupError):
        load_config(tmp_path / "missing.toml", qmp_path="/q", control_path="/c",
                    runtime_dir="/r")
