"""The house's floors, read from the code's imports: shared/ at the bottom imports no service and no
plugin; a service imports no other service and no plugin (it calls plugins through the contracts in
shared/); a plugin imports no service. Migrations are left out (each is its service's own)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The composition roots build the appliance out of the services; they move above services/ (issue 15).
COMPOSITION_ROOTS: set[str] = set()  # they live in oma/, above everything
# Imports that still cross a floor, each named so that it is removed here once its code moves.
PENDING: set[tuple[str, str]] = set()  # known crossings still to fix (none)


def imports(path: Path) -> set[str]:
    """Every module `path` imports, at any depth (a lazy import inside a function counts)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return found


def crossings() -> set[tuple[str, str]]:
    out = set()
    for top in ("shared", "services", "plugins"):
        for path in (ROOT / top).rglob("*.py"):
            rel = path.relative_to(ROOT).as_posix()
            if "/migrations/" in rel:
                continue
            for module in imports(path):
                if module.split(".")[0] in ("services", "shared", "plugins"):
                    out.add((rel, module))  # the installed package has no such top-level name
                    continue
                head = module.split(".")[1:] if module.startswith("oma.") else module.split(".")
                if head and head[0] not in ("services", "shared", "plugins"):
                    if module.startswith("oma.") and top != "oma":
                        out.add((rel, module))  # a composition root, imported from below
                    continue
                if top == "shared" and head[0] in ("services", "plugins") and rel not in COMPOSITION_ROOTS:
                    out.add((rel, module))
                elif top == "services" and (head[0] == "plugins" or (
                        head[0] == "services" and len(head) > 1 and head[1] != rel.split("/")[1])):
                    out.add((rel, module))
                elif top == "plugins" and head[0] == "services":
                    out.add((rel, module))
    return out


def test_no_import_crosses_a_floor_but_the_named_pending_ones():
    found = crossings()
    assert found <= PENDING, f"imports across the floors: {sorted(found - PENDING)}"
    assert PENDING <= found, f"fixed, remove from PENDING: {sorted(PENDING - found)}"


def test_the_check_sees_a_crossing(tmp_path):
    """The reader is not blind: a lazy import of a plugin inside a service's function is found."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from oma.plugins.vma.client import factory\n    import oma.services.auth.app\n")
    assert imports(probe) == {"oma.plugins.vma.client", "oma.services.auth.app"}
