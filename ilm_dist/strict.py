"""The one YAML reader and the one JSON reader of ilm_dist: a key given twice in one mapping is an error.

PyYAML and ``json`` keep the last of two equal keys without a word, so a second ``train:`` block would
silently drop the first one's settings. Otherwise :func:`load_yaml` is ``yaml.safe_load`` (plain data
only; files from users are untrusted) and :func:`load_json` is ``json.loads``. The callers turn the errors
into their one-line :class:`~ilm_dist.errors.InputError` naming the file.
"""

from __future__ import annotations

import json
from typing import Any

import yaml
from yaml.composer import ComposerError

MERGE_TAG = "tag:yaml.org,2002:merge"  # '<<: *anchor': the mapping's own keys may override merged ones


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping with a key twice, naming its line and the first one's."""

    def compose_mapping_node(self, anchor: str | None) -> yaml.MappingNode:
        node = super().compose_mapping_node(anchor)
        first: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == MERGE_TAG:
                continue  # a collection as a key: SafeLoader refuses it as unhashable; '<<': merged keys
            key = self.construct_object(key_node)
            if key in first:
                raise ComposerError(
                    problem=f"key {key!r} given twice in one mapping (first on line {first[key].line + 1})",
                    problem_mark=key_node.start_mark,
                )
            first[key] = key_node.start_mark
        return node


def load_yaml(text: str) -> Any:
    """``yaml.safe_load(text)``, raising ``yaml.YAMLError`` (with line and key) for a key given twice."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # a SafeLoader: plain data only


class DuplicateKeyError(ValueError):
    """A JSON object holds a key twice; the message names its dotted path."""


class _Pairs(list):
    """One JSON object's (key, value) pairs in file order, before they become a dict."""


def load_json(text: str | bytes) -> Any:
    """``json.loads(text)``, raising :class:`DuplicateKeyError` (a ``ValueError``) for a key given twice."""
    return _unique(json.loads(text, object_pairs_hook=_Pairs), "")


def _unique(value: Any, where: str) -> Any:
    """``value`` with every :class:`_Pairs` made a dict; ``where``: its dotted path with a trailing dot."""
    if isinstance(value, list) and not isinstance(value, _Pairs):
        return [_unique(item, f"{where.removesuffix('.')}[{i}].") for i, item in enumerate(value)]
    if not isinstance(value, _Pairs):
        return value
    out: dict[str, Any] = {}
    for key, item in value:
        if key in out:
            raise DuplicateKeyError(f"key {where + key!r} given twice in one object")
        out[key] = _unique(item, f"{where}{key}.")
    return out
