"""Strict parsing of the JSON and YAML files a user writes (configs, sweeps): a key given twice is an error."""

from __future__ import annotations

import json
from typing import Any

import yaml


class DuplicateKeyError(ValueError):
    """A mapping in a config file gives one key twice (YAML and JSON would silently keep the last)."""


def parse_unique(text: str, *, json_file: bool) -> object:
    """JSON or YAML, refusing a key given twice in one mapping (naming the key and its second line)."""
    if json_file:
        def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
            seen: dict[str, Any] = {}
            for key, value in items:
                if key in seen:
                    lines = [i for i, line in enumerate(text.splitlines(), 1) if f'"{key}"' in line]
                    where = f" (line {lines[1]})" if len(lines) > 1 else ""
                    raise DuplicateKeyError(f"key {key!r} is given twice{where}")
                seen[key] = value
            return seen
        return json.loads(text, object_pairs_hook=pairs)

    class UniqueLoader(yaml.SafeLoader):
        pass

    def mapping(loader: Any, node: Any, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                raise DuplicateKeyError(f"key {key!r} is given twice (line {key_node.start_mark.line + 1})")
            seen.add(key)
        return loader.construct_mapping(node, deep=deep)

    UniqueLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return yaml.load(text, Loader=UniqueLoader)
