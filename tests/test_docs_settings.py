"""The docs name only settings that exist: every `OMA_X` in README.md and docs/*.md is a variable of
the one Settings tree (`shared.settings.variables()`: the core's fields and the plugins' sections, the
only variables the appliance reads), and so is every name in a settings table. A doc that calls a
field "not yet a Settings field" is stale too. docs/settings.md's table is generated from that tree."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from oma.shared import settings as settings_mod
from oma.shared.settings import Settings, environ, variables

REPO = Path(__file__).resolve().parent.parent
DOCS = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md")])
VARIABLES = variables()
FIELDS = {v.name for v in VARIABLES}         # nbd_port: the names docs' tables use
ENV = {v.env for v in VARIABLES}             # OMA_NBD_PORT
# `OMA_` names that are not appliance settings, and what they are.
NOT_SETTINGS = {
    "OMA_EVENTS": "the JetStream stream of oma.evt.>",
    "OMA_VCSIM_BIN": "where ops/vcsim/build.sh puts the vCenter simulator (tests, benchmarks)",
    "OMA_GUI_SCREENSHOTS": "tests/test_gui.py refreshes docs/gui/ when set",
    "OMA_VMA_SIM_TOKEN": "oma-vma-sim's appliance token (the simulator's own, not the appliance's)",
}
ENV_NAME = re.compile(r"\bOMA_[A-Z0-9_]*[A-Z0-9]")
IDENTIFIER = re.compile(r"`([a-z][a-z0-9_]*)`")
STALE_HEADING = re.compile(r"not yet|added to `?Settings`? later", re.I)


def env_names(text: str) -> set[str]:
    return {n for n in ENV_NAME.findall(text) if n not in NOT_SETTINGS and not n.startswith("OMA_TEST_")}


def settings_tables(text: str) -> list[tuple[str, int, list[str]]]:
    """(heading, line number, names) for each row of a settings table: a table whose header's first
    cell says "setting", or any table under a heading that says "Settings"."""
    rows, heading, header = [], "", None
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if header is None:
            header = cells[0].lower()
            continue
        if set(cells[0]) <= set("-: ") or not ("setting" in header or "Settings" in heading):
            continue
        rows.append((heading, number, IDENTIFIER.findall(cells[0])))
    return rows


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_docs_name_only_existing_settings(doc: Path):
    text = doc.read_text()
    problems = [f"{name}: not a variable of the Settings tree" for name in sorted(env_names(text))
                if name not in ENV]
    for heading, number, names in settings_tables(text):
        for name in names:
            if name not in FIELDS:
                problems.append(f"line {number}: {name!r} is not a Settings field")
            elif STALE_HEADING.search(heading):
                problems.append(f"line {number}: {name!r} is a Settings field, but {heading!r} says it is not")
    assert problems == []


def test_the_checks_catch_what_they_should():
    assert env_names("set OMA_NBD_GROUP=disk; stream OMA_EVENTS; OMA_TEST_DB_HOST") == {"OMA_NBD_GROUP"}
    table = ("## Configuration\n\n| setting | default |\n|---|---|\n| `nbd_group`, `nbd_port` | root |\n\n"
             "| a |\n|---|\n| `x` |")
    assert settings_tables(table) == [("Configuration", 5, ["nbd_group", "nbd_port"])]
    assert settings_tables("## Settings\n| name | default |\n|--|--|\n| `contexts_batch` | 250 |") == \
        [("Settings", 4, ["contexts_batch"])]


def test_generated_table_is_up_to_date():
    text = settings_mod.DOC.read_text()
    assert settings_mod.with_table(text, settings_mod.markdown()) == text, \
        "run: python3 -m oma.shared.settings --markdown --write"
    documented = set(re.findall(r"^\| `(OMA_[A-Z0-9_]+)` \|", text, re.M))
    assert documented == ENV


def test_every_variable_is_described_once():
    assert [v.env for v in VARIABLES if not (v.field.description or "").strip()] == []
    assert len(ENV) == len(VARIABLES)


def test_plugin_sections_read_their_variables(monkeypatch):
    """OMA_NBD_PORT is the nbd plugin's `port`; a keyword beats the environment; a variable of the
    core that shares the prefix (OMA_NBD_HOST, replication's) stays the core's."""
    monkeypatch.setenv("OMA_NBD_PORT", "10999")
    monkeypatch.setenv("OMA_NBD_TLS_CLIENT_PSK_FILE", "/etc/vma/psk")
    monkeypatch.setenv("OMA_NBD_HOST", "oma.example")
    monkeypatch.setenv("OMA_VMA_RETRIES", "7")
    s = Settings()
    assert (s.nbd.port, s.nbd.tls_client_psk_file, s.nbd_host, s.vma.retries) == \
        (10999, "/etc/vma/psk", "oma.example", 7)
    assert Settings(nbd_port=11000).nbd.port == 11000
    assert Settings(nbd_port=11000).nbd.tls_client_psk_file == "/etc/vma/psk"
    # The environment a child process gets gives it the same tree.
    for key, value in environ(Settings(nbd_port=11001, device_by_id_dir="/tmp/by-id")).items():
        monkeypatch.setenv(key, value)
    again = Settings()
    assert (again.nbd.port, str(again.device.by_id_dir), again.vma.retries) == (11001, "/tmp/by-id", 7)


def test_bad_section_values_name_the_variable(monkeypatch):
    from oma.shared.settings import FlagError, settings_from_flags
    monkeypatch.setenv("OMA_NBD_PORT", "0")
    with pytest.raises(FlagError, match="setting OMA_NBD_PORT: "):
        settings_from_flags({}, "oma-api")
    monkeypatch.delenv("OMA_NBD_PORT")
    with pytest.raises(FlagError, match="flag -vma-timeout: "):
        settings_from_flags({"vma_timeout": "soon"}, "oma-api")
    with pytest.raises(FlagError, match="flag -nbd-bogus: "):
        settings_from_flags({"nbd_bogus": 1}, "oma-api")
