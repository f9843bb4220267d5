"""One registry type for everything calq looks up by name: quantization methods, token-level calibrators,
answer-level calibrators and export formats (one registry each, each with its own contract).

A class is added with `@REGISTRY.register`; a name registered twice is refused. `discover()` imports every module of
calq's own package for that kind (so adding one is one file) and then every entry point of the group `calq.<group>`
(so a plugin package adds one without editing calq), e.g. in the plugin's pyproject.toml:

    [project.entry-points."calq.calibrators"]
    mine = "mypackage.mine"          # a module (or module:object) whose import runs `@register`
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator
from importlib import metadata

from calq.errors import CalqError


class Registry:
    def __init__(self, kind: str, package: str, group: str, key: Callable[[type], str] = lambda cls: cls.name):
        self.kind, self.package, self.group, self.key = kind, package, group, key
        self._classes: dict[str, type] = {}
        self._discovered = self._plugged_in = False

    def register(self, cls: type) -> type:
        name = self.key(cls)
        known = self._classes.get(name)
        if known is not None and known is not cls:
            raise ValueError(f"two {self.kind}s are named '{name}': {known.__module__}.{known.__qualname__} and "
                             f"{cls.__module__}.{cls.__qualname__}; rename one")
        self._classes[name] = cls
        return cls

    def discover(self) -> Registry:
        """Import calq's own modules of this kind, then the plugins'; once."""
        if not self._discovered:
            self._discovered = True
            package = importlib.import_module(self.package)
            for module in pkgutil.iter_modules(package.__path__):
                importlib.import_module(f"{self.package}.{module.name}")
        return self.plugins()

    def plugins(self) -> Registry:
        """Import the modules named by the entry point group `calq.<group>`; once."""
        if not self._plugged_in:
            self._plugged_in = True
            for entry in metadata.entry_points(group=f"calq.{self.group}"):
                entry.load()
        return self

    def get(self, name: str, where: str | None = None) -> type:
        if name not in self._classes:
            raise CalqError(f"unknown {self.kind} '{name}'", where or self.kind,
                            f"use one of: {', '.join(self._classes)}")
        return self._classes[name]

    def items(self):
        return self._classes.items()

    def values(self):
        return self._classes.values()

    def __contains__(self, name: str) -> bool:
        return name in self._classes

    def __iter__(self) -> Iterator[str]:
        return iter(self._classes)
