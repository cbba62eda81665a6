"""YAML read from users' files, walked before anything is built from it.

``yaml.safe_load`` builds plain data only, but three things still go wrong silently or
without bound, and each is caught here on the parser's events (linear, nothing expanded):

- an alias (``*name``) can expand a few hundred bytes into billions of items (a "billion
  laughs"); markdown front matter and accelerate configs never need one;
- nesting thousands deep exhausts the recursion limit while building;
- a key given twice in one mapping keeps its last value and drops the first without a word
  (``split: test`` then ``split: train`` puts a document in train).
"""

from __future__ import annotations

from typing import Any


class YamlRefused(ValueError):
    """Valid YAML that lorakit does not accept: ``problem``, what to do, and the 0-based line."""

    def __init__(self, problem: str, fix: str, line: int):
        super().__init__(problem)
        self.problem, self.fix, self.line = problem, fix, line


def refuse_unsafe_yaml(
    text: str, max_depth: int = 32, loader: Any = None, repeated_keys: bool = True
) -> None:
    """Raise :class:`YamlRefused` for an alias, nesting over ``max_depth`` or (unless
    ``repeated_keys`` is false: the caller reports them itself) a repeated key in ``text``;
    malformed YAML raises ``yaml.YAMLError`` as ``loader`` (default: libyaml's safe loader
    where installed) reports it."""
    import yaml

    loader = loader or getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    # per open container: a mapping's keys so far and whether its next node is a key
    # (None for a sequence)
    stack: list[tuple[set[str], list[bool]] | None] = []
    for event in yaml.parse(text, Loader=loader):
        line = event.start_mark.line if event.start_mark is not None else 0
        if isinstance(event, yaml.AliasEvent):
            raise YamlRefused("a YAML alias (*name)", "write the value out instead", line)
        top = stack[-1] if stack else None
        if top is not None and isinstance(
            event, (yaml.ScalarEvent, yaml.MappingStartEvent, yaml.SequenceStartEvent)
        ):
            keys, at_key = top
            if repeated_keys and at_key[0] and isinstance(event, yaml.ScalarEvent):
                if event.value in keys:
                    raise YamlRefused(
                        f"the key {event.value!r} given twice (YAML keeps only the last value)",
                        "keep one",
                        line,
                    )
                keys.add(event.value)
            at_key[0] = not at_key[0]  # key, value, key, ...
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            stack.append((set(), [True]) if isinstance(event, yaml.MappingStartEvent) else None)
            if len(stack) > max_depth:
                raise YamlRefused(f"nested more than {max_depth} levels deep", "flatten it", line)
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            stack.pop()
