"""The docs name only settings that exist: every `OMA_X` in README.md and docs/*.md is a field `x`
of shared.settings.Settings (the only variables the appliance reads, extra="forbid"), and so is every
name in a settings table. A doc that calls a field "not yet a Settings field" is stale too."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from shared.settings import Settings

REPO = Path(__file__).resolve().parent.parent
DOCS = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md")])
FIELDS = set(Settings.model_fields)
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
    problems = [f"{name}: no Settings field {name[4:].lower()!r}" for name in sorted(env_names(text))
                if name[4:].lower() not in FIELDS]
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
