"""Which names a node leaves alone: ``mirrored-registries`` and ``registry-filters``.

One rule for every place a name is checked (what the node advertises, and every
manifest and blob request, by tag or by digest): a regular expression is searched
in ``registry/repository[:tag]``, the string Spegel matches, and a registry outside
``mirrored-registries`` (when it names any) is excluded outright.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Filters:
    mirrored_registries: frozenset[str] = frozenset()
    patterns: tuple[re.Pattern[str], ...] = ()

    @classmethod
    def of(
        cls, mirrored_registries: Iterable[str] = (), patterns: Iterable[re.Pattern[str]] = ()
    ) -> Filters:
        return cls(frozenset(mirrored_registries), tuple(patterns))

    def __bool__(self) -> bool:
        return bool(self.mirrored_registries or self.patterns)

    def excluded(self, registry: str, repository: str, tag: str | None = None) -> str | None:
        """Why ``registry/repository[:tag]`` is not served, or None when it is."""
        if self.mirrored_registries and registry not in self.mirrored_registries:
            return f"registry {registry} is not in mirrored-registries"
        name = f"{registry}/{repository}" + (f":{tag}" if tag is not None else "")
        for pattern in self.patterns:
            if pattern.search(name):
                return f"{name} is excluded by registry-filters {pattern.pattern!r}"
        return None
