"""Plugin meta-tests: every hook is documented and works; names and typos fail loudly."""
from __future__ import annotations

import re
from pathlib import Path

import pluggy
import pytest

from oma.shared import hookspecs
from oma.shared.hookspecs import hookimpl
from oma.shared.plugins import DEFAULT_PLUGINS, KINDS, BackendNotFound, backends, get_backend, get_plugin_manager

DOCS = Path(__file__).resolve().parent.parent / "docs" / "plugins.md"


def test_every_hook_has_a_documented_heading():
    headings = set(re.findall(r"^## (oma_\w+)$", DOCS.read_text(), re.M))
    assert headings == {fn.__name__ for fn in hookspecs._all()}


def test_every_hook_has_a_kind():
    # oma_register_settings adds a section to the Settings tree, not a backend (tests/test_docs_settings.py).
    assert set(KINDS.values()) | {"oma_register_settings"} == {fn.__name__ for fn in hookspecs._all()}


@pytest.mark.parametrize("kind,hook", sorted(KINDS.items()))
def test_each_hook_registers_a_throwaway_backend(kind, hook):
    pm = get_plugin_manager(load_entrypoints=False)

    class Plugin:
        pass

    def impl(register):
        register("throwaway", lambda *a, **k: ("built", a), description="test")

    impl.__name__ = hook
    setattr(Plugin, hook, staticmethod(hookimpl(impl)))
    plugin = Plugin()
    pm.register(plugin, name="throwaway")
    try:
        backend = get_backend(pm, kind, "throwaway")
        assert backend.factory(1) == ("built", (1,)) and backend.description == "test"
        assert backend.plugin == "throwaway"
    finally:
        pm.unregister(plugin)
    assert "throwaway" not in backends(pm, kind)


def test_builtin_backends_present():
    pm = get_plugin_manager()
    assert {"memory", "mariadb"} <= set(backends(pm, "storage"))
    assert "ossea" in backends(pm, "cloud")
    assert {"nbdkit", "nbd-server"} <= set(backends(pm, "exporter"))
    assert "vsphere" in backends(pm, "inventory")
    assert "by-id" in backends(pm, "device-resolver")
    # Registered under their entry-point names, like third-party plugins.
    assert set(DEFAULT_PLUGINS) <= {name for name, _ in pm.list_name_plugin()}


def test_unknown_backend_names_installed_ones():
    with pytest.raises(BackendNotFound) as exc:
        get_backend(get_plugin_manager(), "exporter", "nope")
    assert "can't be found" in exc.value.message and "nbd-server, nbdkit" in exc.value.message


def test_misspelled_hook_fails_loudly():
    pm = get_plugin_manager(load_entrypoints=False)

    class Typo:
        @hookimpl
        def oma_register_exporter(self, register):  # missing the final s
            pass

    pm.register(Typo())
    with pytest.raises(pluggy.PluginValidationError):
        pm.check_pending()


def test_a_plugin_settings_section_joins_the_one_tree(monkeypatch):
    """A section registered through oma_register_settings becomes `settings.<section>`, read from
    OMA_<SECTION>_<FIELD>, given as <section>_<field>=..., and listed among the variables."""
    from pydantic import Field

    from oma.shared.hookspecs import PluginSettings
    from oma.shared.plugins import settings_sections
    from oma.shared.settings import Settings, compose, variables

    class ThrowawaySettings(PluginSettings):
        depth: int = Field(3, ge=1, description="how deep")

    class Plugin:
        @staticmethod
        @hookimpl
        def oma_register_settings(register):
            register("throwaway", ThrowawaySettings)

    pm = get_plugin_manager(load_entrypoints=False, settings=True)
    pm.register(Plugin(), name="throwaway")
    sections = settings_sections(pm)
    assert set(sections) == {"nbd", "vma", "device", "convert", "throwaway"}
    tree = compose(sections)
    monkeypatch.setenv("OMA_THROWAWAY_DEPTH", "7")
    assert tree().throwaway.depth == 7 and tree(throwaway_depth=9).throwaway.depth == 9
    assert tree().nbd == Settings().nbd
    assert "OMA_THROWAWAY_DEPTH" in {v.env for v in variables(tree)}
    assert "OMA_THROWAWAY_DEPTH" not in {v.env for v in variables()}  # the appliance's tree is unchanged
    with pytest.raises(TypeError, match="core settings' names"):
        compose({"port": ThrowawaySettings})

    class NotSettings:
        @staticmethod
        @hookimpl
        def oma_register_settings(register):
            register("Bad-Name", dict)

    pm.register(NotSettings(), name="bad")
    with pytest.raises(TypeError, match="PluginSettings subclass"):
        settings_sections(pm)
