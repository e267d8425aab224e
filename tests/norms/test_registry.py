"""The normalizer registry: registration, lookup, plugin discovery through entry points, ``resolve``.

Every test works on a fresh :class:`~rnorm.norms.registry.Registry`; plugin discovery is tested
with fake entry points (``importlib.metadata.entry_points`` monkeypatched) that point at modules
written to ``tmp_path``, so neither the real environment nor the global ``NORMALIZERS`` is touched.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import sys
import textwrap
import types
import uuid
import warnings
from collections.abc import Callable, Iterator

import pytest
import torch

from rnorm import norms
from rnorm.norms import NORMALIZERS, LayerNorm, Normalizer
from rnorm.norms.registry import DISABLE_AUTOLOAD_ENV, ENTRY_POINT_GROUP, Registry

GROUP = "rnorm.test_group"


class Alpha(Normalizer):
    """Alpha: the first docstring line.

    Not part of the description.
    """


class Beta(Normalizer):
    """Beta strategy."""


class Undocumented(Normalizer):
    pass


@pytest.fixture
def registry() -> Registry:
    """A fresh registry without an entry-point group: no discovery at all."""
    return Registry("normalizer")


# -- registration ------------------------------------------------------------------------------------
def test_register_as_decorator_and_as_call(registry: Registry) -> None:
    decorated = registry.register("alpha")(Alpha)
    returned = registry.register("beta", Beta)
    assert decorated is Alpha and returned is Beta  # both forms hand the class back unchanged
    assert registry.get("alpha") is Alpha and registry.get("beta") is Beta


def test_taken_name_raises_with_override_hint(registry: Registry) -> None:
    registry.register("alpha", Alpha)
    with pytest.raises(ValueError, match="already registered") as info:
        registry.register("alpha", Beta)
    assert "override=True" in str(info.value) and "Alpha" in str(info.value)
    with pytest.raises(ValueError, match="override=True"):
        registry.register("ALPHA", Beta)  # taken regardless of case
    assert registry.get("alpha") is Alpha


def test_override_replaces(registry: Registry) -> None:
    registry.register("alpha", Alpha)
    registry.register("Alpha", Beta, override=True)
    assert registry.get("alpha") is Beta
    assert registry.available() == {"alpha": "Beta strategy."}


def test_names_are_case_insensitive(registry: Registry) -> None:
    registry.register("MixedCase", Alpha)
    assert registry.get("mixedcase") is Alpha and registry.get("MIXEDCASE") is Alpha
    assert list(registry.available()) == ["mixedcase"]
    assert registry.entries["mixedcase"].name == "mixedcase"


def test_unknown_name_lists_sorted_available_names(registry: Registry) -> None:
    for name in ("zeta", "alpha", "mid"):
        registry.register(name, Alpha if name != "mid" else Beta, override=True)
    with pytest.raises(ValueError) as info:
        registry.get("nope")
    message = str(info.value)
    assert "'nope'" in message and "normalizer" in message
    assert "Available names: alpha, mid, zeta." in message


def test_available_is_sorted_with_one_line_descriptions(registry: Registry) -> None:
    registry.register("zz", Beta)
    registry.register("aa", Alpha)
    registry.register("mm", Undocumented)
    registry.register("bb", Alpha, description="given explicitly")
    listing = registry.available()
    assert list(listing) == ["aa", "bb", "mm", "zz"]
    assert listing == {
        "aa": "Alpha: the first docstring line.",
        "bb": "given explicitly",
        "mm": "",
        "zz": "Beta strategy.",
    }
    listing["aa"] = "changed"  # a copy: editing it changes nothing
    assert registry.available()["aa"] == "Alpha: the first docstring line."


def test_entries_is_a_read_only_view(registry: Registry) -> None:
    registry.register("alpha", Alpha)
    view = registry.entries
    assert isinstance(view, types.MappingProxyType)
    with pytest.raises(TypeError):
        view["beta"] = view["alpha"]  # type: ignore[index]
    with pytest.raises(TypeError):
        del view["alpha"]  # type: ignore[attr-defined]
    entry = view["alpha"]
    assert (entry.name, entry.cls, entry.description) == ("alpha", Alpha, "Alpha: the first docstring line.")
    with pytest.raises(dataclasses.FrozenInstanceError):
        entry.cls = Beta  # type: ignore[misc]
    registry.register("beta", Beta)
    assert "beta" in view  # a live view, not a snapshot


def test_global_registry_holds_the_builtin_strategies() -> None:
    assert NORMALIZERS.entry_point_group == ENTRY_POINT_GROUP == "rnorm.normalizers"
    assert norms.register == NORMALIZERS.register
    assert {"bn", "ln", "none", "normprop", "seqbn", "wn"} <= set(norms.available())
    assert list(norms.available()) == sorted(norms.available())
    assert norms.get("LN") is LayerNorm
    assert isinstance(NORMALIZERS.entries, types.MappingProxyType)


# -- plugins through entry points --------------------------------------------------------------------
# Each module records its import in the host module's IMPORTED list; "{host}" is the host's name.
PLUGIN_SOURCES = {
    "good": '''
        import {host} as host
        from rnorm.norms import Normalizer

        host.IMPORTED.append("good")


        class GoodNorm(Normalizer):
            """A class-valued test plugin.

            Registered by the registry under its entry point's name.
            """


        class OtherNorm(Normalizer):
            """Another class-valued test plugin."""
    ''',
    "registering": """
        import {host} as host
        from rnorm.norms import Normalizer

        host.IMPORTED.append("registering")


        @host.REGISTRY.register("decorated", description="registered by its module's decorator")
        class DecoratedNorm(Normalizer):
            pass
    """,
    "broken": """
        import {host} as host

        host.IMPORTED.append("broken")
        raise RuntimeError("boom: a dependency of this plugin is missing")
    """,
    "selfref": '''
        import {host} as host
        from rnorm.norms import Normalizer

        host.IMPORTED.append("selfref")
        SEEN = list(host.REGISTRY.available())  # a lookup while discovery is under way
        GOOD = host.REGISTRY.get("good")


        class SelfRefNorm(Normalizer):
            """Looks the registry up while it is imported."""
    ''',
}

# The usual set: a class-valued plugin, a module-valued one, a broken one.
STANDARD = [("good", "good", "GoodNorm"), ("modplugin", "registering", None), ("broken", "broken", None)]


@dataclasses.dataclass
class PluginWorld:
    registry: Registry
    host: types.ModuleType  # .IMPORTED: plugin modules imported so far, in order
    calls: list[dict]  # the keyword arguments of every entry_points() call
    modules: dict[str, str]  # PLUGIN_SOURCES key -> module name


@pytest.fixture
def make_world(tmp_path, monkeypatch) -> Iterator[Callable[..., PluginWorld]]:
    """A factory of a fresh registry whose entry-point group holds the given fake plugins.

    Arguments are ``(entry point name, PLUGIN_SOURCES key, attribute or None)``; the modules are
    written under unique names, and removed from ``sys.modules`` afterwards.
    """
    prefix = f"rnorm_test_plugin_{uuid.uuid4().hex[:8]}"

    def make(specs: list[tuple[str, str, str | None]]) -> PluginWorld:
        registry = Registry("normalizer", entry_point_group=GROUP)
        host = types.ModuleType(f"{prefix}_host")
        host.REGISTRY, host.IMPORTED = registry, []
        monkeypatch.setitem(sys.modules, host.__name__, host)
        modules = {key: f"{prefix}_{key}" for key in PLUGIN_SOURCES}
        for key, module in modules.items():
            source = textwrap.dedent(PLUGIN_SOURCES[key]).replace("{host}", host.__name__)
            (tmp_path / f"{module}.py").write_text(source)
        monkeypatch.syspath_prepend(str(tmp_path))
        points = [
            importlib.metadata.EntryPoint(name, modules[key] + (f":{attr}" if attr else ""), GROUP)
            for name, key, attr in specs
        ]
        points.append(importlib.metadata.EntryPoint("elsewhere", f"{modules['broken']}", "rnorm.other_group"))
        calls: list[dict] = []

        def fake_entry_points(**kwargs):
            calls.append(kwargs)
            selected = [ep for ep in points if ep.group == kwargs.get("group")]
            return importlib.metadata.EntryPoints(selected)

        monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points)
        return PluginWorld(registry, host, calls, modules)

    yield make
    for name in [name for name in sys.modules if name.startswith(prefix)]:
        del sys.modules[name]


def lookup_quietly(action: Callable[[], object]) -> object:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return action()


def test_discovery_is_lazy(make_world) -> None:
    world = make_world(STANDARD)
    world.registry.register("alpha", Alpha)  # registering does not discover
    assert world.calls == [] and world.host.IMPORTED == []
    assert not any(name in sys.modules for name in world.modules.values())

    assert lookup_quietly(lambda: world.registry.get("good")).__name__ == "GoodNorm"
    assert world.calls == [{"group": GROUP}]
    assert world.host.IMPORTED == ["good", "registering", "broken"]

    lookup_quietly(world.registry.available)  # discovery happens once
    lookup_quietly(lambda: world.registry.entries)
    assert len(world.calls) == 1 and world.host.IMPORTED == ["good", "registering", "broken"]


@pytest.mark.parametrize("first_lookup", ["available", "entries", "get"])
def test_every_lookup_discovers(make_world, first_lookup: str) -> None:
    world = make_world(STANDARD)
    first = {"available": world.registry.available, "entries": lambda: world.registry.entries}
    first["get"] = lambda: world.registry.get("decorated")
    lookup_quietly(first[first_lookup])
    assert len(world.calls) == 1 and "good" in world.registry.entries


def test_plugins_are_listed(make_world) -> None:
    world = make_world(STANDARD)
    world.registry.register("alpha", Alpha)
    listing = lookup_quietly(world.registry.available)
    assert listing == {
        "alpha": "Alpha: the first docstring line.",
        "decorated": "registered by its module's decorator",
        "good": "A class-valued test plugin.",
    }
    good_module = sys.modules[world.modules["good"]]
    assert world.registry.get("GOOD") is good_module.GoodNorm
    assert world.registry.get("decorated") is sys.modules[world.modules["registering"]].DecoratedNorm
    with pytest.raises(ValueError, match="not a registered normalizer"):
        world.registry.get("modplugin")  # a module-valued entry point's own name registers nothing


def test_broken_plugin_warns_once_naming_plugin_and_error(make_world) -> None:
    world = make_world(STANDARD)
    with pytest.warns(RuntimeWarning) as record:
        listing = world.registry.available()
    assert sorted(listing) == ["decorated", "good"]
    messages = [str(w.message) for w in record if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1
    assert 'rnorm plugin "broken"' in messages[0]
    assert "RuntimeError: boom: a dependency of this plugin is missing" in messages[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        world.registry.available()  # not warned again


def test_requesting_broken_plugin_raises_import_error(make_world) -> None:
    world = make_world(STANDARD)
    for name in ("broken", "BROKEN"):
        with pytest.raises(ImportError) as info:
            lookup_quietly(lambda name=name: world.registry.get(name))
        message = str(info.value)
        assert 'rnorm plugin "broken"' in message
        assert "RuntimeError: boom: a dependency of this plugin is missing" in message
    assert world.registry.get("good").__name__ == "GoodNorm"  # the others still work


def test_broken_plugin_import_error_chains_the_original(make_world) -> None:
    # STYLE.md: a failing import becomes ImportError(...) from e, so the plugin's own traceback
    # (the line that failed in the third-party module) is kept.
    world = make_world(STANDARD)
    with pytest.raises(ImportError) as info:
        lookup_quietly(lambda: world.registry.get("broken"))
    assert isinstance(info.value.__cause__, RuntimeError)
    assert "boom" in str(info.value.__cause__)


def test_disable_autoload_turns_discovery_off(make_world, monkeypatch) -> None:
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "1")
    world = make_world(STANDARD)
    world.registry.register("alpha", Alpha)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert world.registry.available() == {"alpha": "Alpha: the first docstring line."}
        with pytest.raises(ValueError, match="Available names: alpha."):
            world.registry.get("good")
        with pytest.raises(ValueError):
            world.registry.get("broken")  # never tried: unknown, not an ImportError
    assert world.calls == [] and world.host.IMPORTED == []


def test_empty_disable_variable_keeps_discovery_on(make_world, monkeypatch) -> None:
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "")
    world = make_world(STANDARD)
    assert "good" in lookup_quietly(world.registry.available)


def test_plugin_looking_up_the_registry_while_imported_does_not_recurse(make_world) -> None:
    world = make_world([("good", "good", "GoodNorm"), ("selfref", "selfref", "SelfRefNorm")])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed plugin import would warn
        listing = world.registry.available()
    assert sorted(listing) == ["good", "selfref"]
    assert world.calls == [{"group": GROUP}]
    assert world.host.IMPORTED == ["good", "selfref"]
    selfref = sys.modules[world.modules["selfref"]]
    assert selfref.SEEN == ["good"]  # what was there when it looked, without a second discovery
    assert selfref.GOOD is world.registry.get("good")


def test_class_plugin_whose_module_registers_it_is_not_registered_twice(make_world) -> None:
    world = make_world([("decorated", "registering", "DecoratedNorm")])
    assert world.registry.available() == {"decorated": "registered by its module's decorator"}


def test_plugin_with_a_taken_name_does_not_break_discovery(make_world) -> None:
    # A third-party plugin named like an existing strategy must not make every lookup raise, nor
    # stop the plugins after it from loading; like an import failure, it is reported by warning.
    world = make_world([("taken", "good", "OtherNorm"), ("good", "good", "GoodNorm")])
    world.registry.register("taken", Alpha)
    with pytest.warns(RuntimeWarning, match='"taken"'):
        listing = world.registry.available()
    assert sorted(listing) == ["good", "taken"]
    assert world.registry.get("taken") is Alpha  # the existing registration wins


def test_reset_plugins_forgets_and_rediscovers(make_world) -> None:
    world = make_world([("good", "good", "GoodNorm"), ("broken", "broken", None)])
    world.registry.register("alpha", Alpha)
    lookup_quietly(world.registry.available)
    world.registry.reset_plugins()
    assert "good" not in world.registry._entries and "alpha" in world.registry._entries
    with pytest.warns(RuntimeWarning, match='"broken"'):
        assert sorted(world.registry.available()) == ["alpha", "good"]
    assert len(world.calls) == 2


def test_reset_plugins_brings_back_module_valued_plugins(make_world) -> None:
    # After reset_plugins() the next lookup should hold the same plugins as before it.
    world = make_world([("modplugin", "registering", None)])
    before = world.registry.available()
    world.registry.reset_plugins()
    assert world.registry.available() == before


# -- resolve: every accepted form of a strategy --------------------------------------------------------
def test_resolve_name_with_hyperparameters() -> None:
    factory = norms.resolve("LN", eps=1e-3, learn_beta=False)
    norm = factory(site="cell", num_features=4)
    assert type(norm) is LayerNorm and norm.eps == 1e-3 and norm.beta is None
    assert (norm.site, norm.num_features) == ("cell", 4)
    with pytest.raises(ValueError, match="Available names"):
        norms.resolve("no-such-strategy")


def test_resolve_class_and_partial() -> None:
    by_class = norms.resolve(LayerNorm, learn_beta=False)(site="input", num_features=8)
    assert type(by_class) is LayerNorm and by_class.beta is None
    partial = functools.partial(LayerNorm, eps=1e-2)
    norm = norms.resolve(partial, gamma_init=0.5)(site="recurrent", num_features=8)
    assert norm.eps == 1e-2 and torch.equal(norm.gamma.detach(), torch.full((8,), 0.5))
    assert partial.keywords == {"eps": 1e-2}  # the given partial is left alone


def test_resolve_instance_deep_copies() -> None:
    prototype = LayerNorm("cell", 4, eps=1e-2)
    with torch.no_grad():
        prototype.gamma.copy_(torch.arange(4.0))
    factory = norms.resolve(prototype)
    first, second = factory(site="cell", num_features=4), factory(site="cell", num_features=4)
    assert first is not prototype and second is not first
    assert first.gamma is not prototype.gamma and first.gamma.data_ptr() != prototype.gamma.data_ptr()
    assert torch.equal(first.gamma, prototype.gamma) and first.eps == 1e-2
    with torch.no_grad():
        first.gamma.add_(1.0)
    assert torch.equal(prototype.gamma.detach(), torch.arange(4.0))
    assert torch.equal(second.gamma.detach(), torch.arange(4.0))


def test_resolve_instance_checks_site_and_size() -> None:
    factory = norms.resolve(LayerNorm("cell", 4))
    with pytest.raises(ValueError, match=r"site='cell'.*site='input'"):
        factory(site="input", num_features=4)
    with pytest.raises(ValueError, match=r"num_features=4.*num_features=16"):
        factory(site="cell", num_features=16)


def test_resolve_instance_rejects_hyperparameters() -> None:
    with pytest.raises(ValueError, match=r"\['eps'\].*already built LayerNorm"):
        norms.resolve(LayerNorm("cell", 4), eps=1e-3)


@pytest.mark.parametrize(
    "spec",
    [
        42,
        None,
        torch.nn.LayerNorm,  # a class, but not a Normalizer
        functools.partial(torch.nn.LayerNorm, 4),
        torch.nn.Linear(2, 2),  # an instance, but not a Normalizer
        lambda site, num_features: LayerNorm(site, num_features),
    ],
    ids=["int", "None", "foreign-class", "foreign-partial", "foreign-instance", "function"],
)
def test_resolve_rejects_other_types(spec: object) -> None:
    with pytest.raises(TypeError, match="Expected a normalizer name, a Normalizer subclass"):
        norms.resolve(spec)  # type: ignore[arg-type]
