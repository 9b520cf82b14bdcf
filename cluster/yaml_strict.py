"""YAML as a config reader needs it: safe, with no duplicate keys and no alias bombs.

PyYAML's ``safe_load`` already refuses Python objects, but it keeps the last of two equal keys
(a second ``learner:`` section silently replaced the first) and it expands aliases without a
limit: nine nested levels of ten aliases make a 1.8 KB file that stands for 10^9 values, which
costs nothing to load (aliases share one object) and hangs whatever walks it next (validation,
an error message quoting it). ``load`` refuses both, so every later step sees a small tree.
"""
from __future__ import annotations

from typing import Any

import yaml

# A config holds a few hundred values; a tree past this many, counting each alias expansion,
# is an alias bomb or a mistake, not a job.
MAX_NODES = 20_000


class YamlProblem(ValueError):
    """Text that is not a config-shaped YAML document; the message is a predicate ("is not
    valid YAML: ... at line 2"), to follow the name of what was read."""


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping holding one key twice."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)):
                continue  # an unhashable key fails in the base class with its own message
            line = key_node.start_mark.line + 1
            if key in seen:
                raise YamlProblem(f"holds the key {shorten(repr(key))} twice in one mapping (lines "
                                  f"{seen[key]} and {line}); YAML would keep only the second, so "
                                  f"merge them into one")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def shorten(text: str, limit: int = 120) -> str:
    """``text`` cut to ``limit`` characters, so an error line stays a line."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


def load(text: str) -> Any:
    """Parse one YAML document; YamlProblem for invalid YAML, a duplicate key or an oversized tree."""
    try:
        tree = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise YamlProblem(f"is not valid YAML: {shorten(str(what))}{where}") from None
    except RecursionError:
        raise YamlProblem("is nested too deeply to be a config") from None
    _check_size(tree)
    return tree


def _check_size(tree: Any) -> None:
    """Count the values of ``tree`` as a reader walking it would (aliases expanded), stopping at
    MAX_NODES, so the count itself cannot hang."""
    budget, stack = MAX_NODES, [tree]
    while stack:
        node = stack.pop()
        budget -= 1
        if budget < 0:
            raise YamlProblem(f"expands to more than {MAX_NODES} values (aliases such as *a are "
                              f"counted each time they are used); a config is far smaller: write "
                              f"the values out, or use fewer aliases")
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
