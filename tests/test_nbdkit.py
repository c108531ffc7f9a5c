"""Unit tests of nbdkit command-line building: nothing a client sends becomes an option."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.config import Config
from agent.errors import BadRequest, FilterNotAllowed, ParamNotAllowed, PluginNotAllowed
from agent.nbdkit import ExportSpec, FilterSpec, build_argv, check_export, check_socket_path

CFG = Config(qmp_path=Path("/q"), control_path=Path("/c"), runtime_dir=Path("/r"))


def test_argv_shape() -> None:
    spec = ExportSpec("file", {"file": "/img"}, (FilterSpec("retry", {"retries": "3"}),
                                                 FilterSpec("readahead")), readonly=True)
    check_export(spec, CFG)
    assert build_argv("nbdkit", spec) == [
        "nbdkit", "--foreground", "--readonly", "--filter=retry", "--filter=readahead",
        "--", "file", "retries=3", "file=/img"]


@pytest.mark.parametrize("plugin", ["sh", "eval", "cc", "python", "perl", "lua", "ruby",
                                    "tcl", "ocaml", "golang", "rust", "tmpdisk", "iso",
                                    "ondemand", "../file", "--run", "File", ""])
def test_code_running_plugins_refused(plugin: str) -> None:
    with pytest.raises(PluginNotAllowed):
        check_export(ExportSpec(plugin), CFG)


@pytest.mark.parametrize("flt", ["log", "stats", "exitwhen", "tar", "ip", "--run", "x/y"])
def test_filters_outside_allowlist_refused(flt: str) -> None:
    with pytest.raises(FilterNotAllowed):
        check_export(ExportSpec("memory", {"size": "1M"}, (FilterSpec(flt),)), CFG)


@pytest.mark.parametrize(("plugin", "key"), [
    ("curl", "header-script"), ("curl", "cookie-script"), ("curl", "password"),
    ("nbd", "command"), ("nbd", "socket-fd"), ("ssh", "config"), ("file", "cookie")])
def test_dangerous_params_refused(plugin: str, key: str) -> None:
    with pytest.raises(ParamNotAllowed):
        check_export(ExportSpec(plugin, {key: "x"}), CFG)
    # ... also when smuggled in as a filter's parameter (same namespace).
    with pytest.raises(ParamNotAllowed):
        check_export(ExportSpec(plugin, {}, (FilterSpec("retry", {key: "x"}),)), CFG)


@pytest.mark.parametrize("key", ["--run", "-U", "a=b", "", "a b", "k\n", "é", "x" * 65])
def test_bad_keys_refused(key: str) -> None:
    with pytest.raises(BadRequest):
        check_export(ExportSpec("memory", {key: "1"}), CFG)


@pytest.mark.parametrize("value", ["a\nb", "\x00", "\x1b[31m", "x" * 5000])
def test_bad_values_refused(value: str) -> None:
    with pytest.raises(BadRequest):
        check_export(ExportSpec("memory", {"size": value}), CFG)


@given(st.dictionaries(st.from_regex(r"[A-Za-z_][A-Za-z0-9_.-]{0,10}", fullmatch=True),
                       st.text(alphabet=st.characters(min_codepoint=0x20,
                                                      blacklist_characters="\x7f"),
                               max_size=40),
                       max_size=8))
def test_values_never_become_options(params: dict[str, str]) -> None:
    spec = ExportSpec("memory", params)
    check_export(spec, CFG)
    argv = build_argv("nbdkit", spec)
    sep = argv.index("--")
    assert argv[:sep] == ["nbdkit", "--foreground"]
    assert argv[sep + 1] == "memory"
    # every client word is one key=value word after "--", its key first
    assert argv[sep + 2:] == [f"{k}={v}" for k, v in params.items()]


def test_socket_path_limit() -> None:
    check_socket_path(Path("/" + "a" * 106))
    with pytest.raises(BadRequest):
        check_socket_path(Path("/" + "a" * 107))
