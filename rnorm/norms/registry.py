"""A name → class registry for normalization strategies, with lazy plugin discovery.

Strategies register themselves with a decorator::

    @register("bn", description="per-timestep batch normalization")
    class TimeBatchNorm(Normalizer): ...

Third-party packages add strategies through the ``rnorm.normalizers`` entry-point group. Entry
points are discovered at the first lookup (not at import of :mod:`rnorm`), and each one is
imported then. A plugin that fails to import is reported with a warning naming it, and asking for
it by name raises an :class:`ImportError` that carries the original error. Set the environment
variable ``RNORM_DISABLE_PLUGIN_AUTOLOAD`` to any non-empty value to turn discovery off.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import os
import types
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

ENTRY_POINT_GROUP = "rnorm.normalizers"
DISABLE_AUTOLOAD_ENV = "RNORM_DISABLE_PLUGIN_AUTOLOAD"


@dataclass(frozen=True)
class RegistryEntry:
    """One registered strategy: its class and a one-line description."""

    name: str
    cls: type
    description: str


def _first_line(doc: str | None) -> str:
    return (inspect.cleandoc(doc).splitlines() or [""])[0] if doc else ""


class Registry:
    """A registry of classes by lowercase name, filled by decorators and entry points.

    Args:
        kind: what is registered, for error messages (``"normalizer"``).
        entry_point_group: the entry-point group searched for plugins, or ``None`` for none.
    """

    def __init__(self, kind: str, entry_point_group: str | None = None) -> None:
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._entries: dict[str, RegistryEntry] = {}
        self._plugin_errors: dict[str, tuple[str, Exception]] = {}  # name -> (message, error)
        self._plugin_entries: dict[str, dict[str, RegistryEntry]] = {}  # entry-point value -> what it added
        self._plugins_loaded = entry_point_group is None

    # -- registration -------------------------------------------------------------------------
    def register(
        self, name: str, obj: type | None = None, *, description: str = "", override: bool = False
    ) -> Any:
        """Register ``obj`` under ``name``; usable as ``@registry.register("name")`` or a call.

        The description defaults to the first line of the class docstring. Registering a name
        that is taken raises ``ValueError`` unless ``override=True``.
        """
        key = name.lower()

        def _do_register(cls: type) -> type:
            if key in self._entries and not override:
                existing = self._entries[key].cls
                raise ValueError(
                    f"A {self.kind} named {key!r} is already registered ({existing.__module__}."
                    f"{existing.__qualname__}); use override=True to replace it."
                )
            text = description or _first_line(cls.__doc__)
            self._entries[key] = RegistryEntry(key, cls, text)
            return cls

        return _do_register if obj is None else _do_register(obj)

    # -- lookup -------------------------------------------------------------------------------
    @property
    def entries(self) -> Mapping[str, RegistryEntry]:
        """A read-only view of every registered entry, plugins included."""
        self._load_plugins()
        return types.MappingProxyType(self._entries)

    def available(self) -> dict[str, str]:
        """Every registered name (plugins included), sorted, mapped to its one-line description."""
        self._load_plugins()
        return {name: self._entries[name].description for name in sorted(self._entries)}

    def get(self, name: str) -> type:
        """The class registered under ``name`` (case-insensitive).

        Raises:
            ImportError: ``name`` is a plugin whose import failed; the message says why.
            ValueError: no such name; the message lists the known ones.
        """
        self._load_plugins()
        key = str(name).lower()
        if key in self._entries:
            return self._entries[key].cls
        if key in self._plugin_errors:
            message, error = self._plugin_errors[key]
            raise ImportError(message) from error
        raise ValueError(
            f"{name!r} is not a registered {self.kind}. Available names: "
            f"{', '.join(sorted(self._entries))}."
        )

    # -- plugins ------------------------------------------------------------------------------
    def _load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        # Set first: a plugin module that imports rnorm.norms and looks something up must not
        # recurse into discovery.
        self._plugins_loaded = True
        if os.environ.get(DISABLE_AUTOLOAD_ENV):
            return
        for entry_point in importlib.metadata.entry_points(group=self.entry_point_group):
            before = dict(self._entries)
            if self._load_plugin(entry_point):
                added = {k: e for k, e in self._entries.items() if before.get(k) is not e}
                self._plugin_entries.setdefault(entry_point.value, {}).update(added)

    def _load_plugin(self, entry_point: importlib.metadata.EntryPoint) -> bool:
        """Import one entry point; ``False`` if its import failed (reported, not raised)."""
        name = entry_point.name.lower()
        dist = entry_point.dist.name if entry_point.dist is not None else "an unknown distribution"
        origin = f'rnorm plugin "{name}" from {dist} ({entry_point.value})'
        if entry_point.value in self._plugin_entries:
            # Imported before a reset_plugins(): the module's decorators will not run again.
            self._entries.update(self._plugin_entries[entry_point.value])
            return True
        try:
            loaded = entry_point.load()
        except Exception as err:  # any failure inside a third-party import is reported, not hidden
            self._plugin_errors[name] = (f"Error importing {origin}: {type(err).__name__}: {err}", err)
            warnings.warn(self._plugin_errors[name][0], RuntimeWarning, stacklevel=4)
            return False
        # An entry point may name the class itself (registered here under the entry-point name
        # unless its module already registered it) or a module whose import registers classes.
        if inspect.isclass(loaded) and not any(e.cls is loaded for e in self._entries.values()):
            if name in self._entries:
                existing = self._entries[name].cls
                warnings.warn(
                    f"Ignoring {origin}: the name is taken by {existing.__module__}.{existing.__qualname__}.",
                    RuntimeWarning,
                    stacklevel=4,
                )
                return True
            self.register(name, loaded)
        return True

    def reset_plugins(self) -> None:
        """Forget plugin discovery so the next lookup searches the entry points again (tests)."""
        for added in self._plugin_entries.values():
            for key, entry in added.items():
                if self._entries.get(key) is entry:
                    del self._entries[key]
        self._plugin_errors.clear()
        self._plugins_loaded = self.entry_point_group is None


#: The registry of normalization strategies; ``register`` is its decorator.
NORMALIZERS = Registry("normalizer", entry_point_group=ENTRY_POINT_GROUP)
register = NORMALIZERS.register
