"""The generic policy walker: YAML nodes checked against declarative field specs.

A converter is `convert(walk, node, path) -> value`; on a problem it reports it
to the `Walk` (file, line, key path, message) and returns `INVALID`, so one pass
collects every problem in the file instead of stopping at the first.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from decimal import Decimal
from typing import Any

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from gateway.errors import PolicyProblem


class _Invalid:
    """The marker a converter returns after it has reported a problem."""

    def __repr__(self) -> str:
        return "INVALID"


INVALID: Any = _Invalid()

_TAG = "tag:yaml.org,2002:"
STR, INT, FLOAT, BOOL, NULL, MERGE = (_TAG + name for name in ("str", "int", "float", "bool", "null", "merge"))

EXPONENT = re.compile(r"[-+]?[0-9]+(\.[0-9]*)?[eE][-+]?[0-9]+")

Converter = Callable[["Walk", Node, str], Any]
Check = Callable[[Any], "str | None"]
Entries = dict[str, tuple[Node, Node]]


@dataclass
class Walk:
    """One pass over one policy file: the problems found, the names defined and referenced."""

    source: str
    problems: list[PolicyProblem] = field(default_factory=list)
    #: kind -> name -> (line, key path) where it was defined
    defined: dict[str, dict[str, tuple[int, str]]] = field(default_factory=dict)
    references: list[tuple[str, str, Node, str]] = field(default_factory=list)
    constructor: SafeConstructor = field(default_factory=SafeConstructor)
    #: the entries of each mapping read through a merge key (<<), by node id
    merged: dict[int, Any] = field(default_factory=dict)

    def report(self, node: Node | None, path: str, message: str) -> Any:
        """Record one problem at a node's line; returns INVALID for the caller to return."""
        line = line_of(node) if node is not None else None
        self.problems.append(PolicyProblem(self.source, line, path, message))
        return INVALID

    def define(self, kind: str, name: str, node: Node, path: str, *, quoted: bool = True) -> None:
        """Record a name of some kind, reporting a second definition of it (naming it unless not `quoted`)."""
        names = self.defined.setdefault(kind, {})
        if name in names:
            first_line, first_path = names[name]
            shown = f" '{name}'" if quoted else ""
            self.report(node, path, f"duplicate {kind}{shown} (first at line {first_line}, {first_path})")
        else:
            names[name] = (line_of(node), path)

    def resolve_references(self) -> None:
        """Report every reference to an undefined name, for the kinds whose section was read."""
        for kind, name, node, path in self.references:
            names = self.defined.get(kind)
            if names is not None and name not in names:
                hint = did_you_mean(name, names) if names else f" (the policy defines no {kind})"
                self.report(node, path, f"unknown {kind} '{name}'{hint}")


def line_of(node: Node) -> int:
    """The 1-based line a node starts on."""
    return node.start_mark.line + 1


def join(path: str, key: str) -> str:
    """The key path of a key inside the mapping at `path`."""
    return f"{path}.{key}" if path else key


def is_null(node: Node) -> bool:
    """Whether a node is YAML null (`~`, `null` or an empty value)."""
    return isinstance(node, ScalarNode) and node.tag == NULL


def describe(node: Node) -> str:
    """What a node is, in words, for 'expected X, got Y'."""
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    kinds = {NULL: "an empty value", BOOL: "boolean", INT: "integer", FLOAT: "number", STR: "string"}
    if node.tag == NULL:
        return kinds[NULL]
    return f"{kinds.get(node.tag, node.tag)} '{node.value}'"


def did_you_mean(word: str, options: Mapping[str, Any] | tuple[str, ...], *, list_all: bool = True) -> str:
    """A ' (did you mean ...?)' hint, or the short list of valid options, or nothing."""
    names = list(options)
    close = difflib.get_close_matches(word, names, n=1)
    if close:
        return f" (did you mean '{close[0]}'?)"
    if list_all and 0 < len(names) <= 12:
        return f" (expected one of: {', '.join(names)})"
    return ""


def mapping_entries(walk: Walk, node: Node, path: str, depth: int = 0) -> Entries:
    """A mapping's keys (merge keys applied, null as empty); reports duplicates and non-mappings."""
    if is_null(node):
        return {}
    if not isinstance(node, MappingNode):
        return walk.report(node, path, f"expected a mapping, got {describe(node)}")
    if depth > 16:
        return walk.report(node, path, "merge keys (<<) nested too deeply: does a mapping merge itself?")
    entries: Entries = {}
    merges: list[Node] = []
    for key_node, value_node in node.value:
        if key_node.tag == MERGE:
            merges.extend(value_node.value if isinstance(value_node, SequenceNode) else [value_node])
        elif not isinstance(key_node, ScalarNode):
            walk.report(key_node, path, f"a key must be a plain name, got {describe(key_node)}")
        elif key_node.value in entries:
            first = line_of(entries[key_node.value][0])
            walk.report(key_node, join(path, key_node.value), f"duplicate key '{key_node.value}' (first at line {first})")
        else:
            entries[key_node.value] = (key_node, value_node)
    for source in merges:
        merged = walk.merged.get(id(source))
        if merged is None:      # each merged mapping is read once, however many aliases name it (no bomb)
            merged = walk.merged[id(source)] = mapping_entries(walk, source, path, depth + 1)
        for key, pair in ({} if merged is INVALID else merged).items():
            entries.setdefault(key, pair)
    return entries


@dataclass(frozen=True)
class Spec:
    """How one YAML key becomes a dataclass field."""

    convert: Converter
    required: bool = False
    attr: str | None = None                     # the field's name when it differs from the key
    spread: bool = False                        # the converter returns several fields, as a dict
    missing: Callable[[], Any] | None = None    # the value when absent and the dataclass has no default


@dataclass(frozen=True)
class Section:
    """A YAML mapping that becomes one dataclass; callable as a converter."""

    cls: Callable[..., Any]
    specs: Mapping[str, Spec | Converter]
    named: tuple[str, ...] = ()                 # fields that default to the mapping's own key
    checks: tuple[Callable[[dict[str, Any]], "tuple[str, str] | None"], ...] = ()

    def __call__(self, walk: Walk, node: Node, path: str, name: str | None = None) -> Any:
        """Convert one mapping node; INVALID when anything in it was wrong."""
        entries = mapping_entries(walk, node, path)
        if entries is INVALID:
            return INVALID
        values: dict[str, Any] = dict.fromkeys(self.named, name) if name is not None else {}
        ok = all([self._put(walk, values, key, pair, join(path, key)) for key, pair in entries.items()])
        ok = self._complete(walk, values, entries, node, path) and ok
        return self.cls(**values) if ok and self._checked(walk, values, entries, node, path) else INVALID

    def spec(self, key: str) -> Spec | None:
        """The spec of one YAML key, or None when the key is unknown."""
        spec = self.specs.get(key)
        return spec if spec is None or isinstance(spec, Spec) else Spec(spec)

    def _put(self, walk: Walk, values: dict[str, Any], key: str, pair: tuple[Node, Node], path: str) -> bool:
        """Convert one key's value into `values`; False when it was wrong."""
        key_node, value_node = pair
        spec = self.spec(key)
        if spec is None:
            walk.report(key_node, path, f"unknown key '{key}'{did_you_mean(key, self.specs)}")
            return False
        attr = spec.attr or key
        nullable = attr in nullable_fields(self.cls) and is_null(value_node)
        value = None if nullable else spec.convert(walk, value_node, path)
        if value is INVALID:
            return False
        if spec.spread:
            values.update(value)
        else:
            values[attr] = value
        return True

    def _complete(self, walk: Walk, values: dict[str, Any], entries: Entries, node: Node, path: str) -> bool:
        """Report missing required keys and fill the defaults the dataclass lacks."""
        ok = True
        for key in [key for key in self.specs if key not in entries]:
            spec = self.spec(key)
            if spec.required:
                walk.report(node, join(path, key), "missing required key")
                ok = False
            elif spec.missing is not None:
                values[spec.attr or key] = spec.missing()
        return ok

    def _checked(self, walk: Walk, values: dict[str, Any], entries: Entries, node: Node, path: str) -> bool:
        """Run the cross-field checks; each names the key it blames."""
        ok = True
        for check in self.checks:
            found = check(values)
            if found:
                key, message = found
                walk.report(entries[key][1] if key in entries else node, join(path, key), message)
                ok = False
        return ok


def nullable_fields(cls: Any) -> set[str]:
    """The fields of a dataclass that may be None (written as null in YAML)."""
    return {f.name for f in fields(cls) if "None" in str(f.type)} if is_dataclass(cls) else set()


def scalar(tags: tuple[str, ...], expected: str, cast: Callable[[Any], Any], *checks: Check) -> Converter:
    """A converter for a scalar of some YAML types, cast, then checked."""
    def convert(walk: Walk, node: Node, path: str) -> Any:
        node = as_yaml12_float(node) if FLOAT in tags else node
        if not isinstance(node, ScalarNode) or node.tag not in tags:
            return walk.report(node, path, f"expected {expected}, got {describe(node)}")
        if node.tag in (INT, FLOAT) and node.style is None and YAML11_NUMBER.fullmatch(node.value):
            return walk.report(node, path, f"write {node.value!r} in decimal: YAML 1.1 reads a leading 0 as octal, "
                                           f"0x and 0b as hex and binary, and ':' as base 60")
        try:
            value = cast(walk.constructor.construct_object(node))
        except (yaml.YAMLError, ValueError, ArithmeticError) as exc:
            return walk.report(node, path, f"invalid {expected}: {exc}")
        for check in checks:
            message = check(value)
            if message:
                return walk.report(node, path, message)
        return value
    return convert


#: numbers PyYAML (YAML 1.1) reads in another base: 010 is 8, 0x10 is 16, 0b10 is 2, 1:30 is 90
YAML11_NUMBER = re.compile(r"[-+]?(0[0-9_]+|0[xob][0-9a-fA-F_]+|[0-9][0-9_]*(:[0-5]?[0-9])+(\.[0-9_]*)?)")


def as_yaml12_float(node: Node) -> Node:
    """A plain `1e-7` as a float node: PyYAML (YAML 1.1) reads exponents without a dot as strings."""
    if isinstance(node, ScalarNode) and node.tag == STR and node.style is None and EXPONENT.fullmatch(node.value):
        return ScalarNode(FLOAT, node.value, node.start_mark, node.end_mark)
    return node


def integer(*checks: Check) -> Converter:
    """An integer (booleans are not integers here)."""
    return scalar((INT,), "an integer", int, *checks)


def real(*checks: Check) -> Converter:
    """A finite number, as float."""
    return scalar((INT, FLOAT), "a number", float, finite, *checks)


def money(*checks: Check) -> Converter:
    """A finite amount of USD, as Decimal(str(value))."""
    return scalar((INT, FLOAT), "a number (USD)", lambda value: Decimal(str(value)), finite, *checks)


def text(*checks: Check) -> Converter:
    """A string; quote it in YAML when it looks like a number."""
    return scalar((STR,), "a string", str, *checks)


def flag() -> Converter:
    """A boolean."""
    return scalar((BOOL,), "true or false", bool)


def items(convert_item: Converter, *, non_empty: bool = False, distinct: bool = False) -> Converter:
    """A list (null as empty) of items, as a tuple; with `distinct`, an item given twice is a problem at the
    second."""
    def convert(walk: Walk, node: Node, path: str) -> Any:
        if is_null(node):
            values: list[Any] = []
        elif isinstance(node, SequenceNode):
            values = [convert_item(walk, child, f"{path}[{i}]") for i, child in enumerate(node.value)]
        else:
            return walk.report(node, path, f"expected a list, got {describe(node)}")
        if non_empty and not values:
            return walk.report(node, path, "must not be empty")
        if distinct:
            values = _distinct(walk, node, path, values)
        return INVALID if any(value is INVALID for value in values) else tuple(values)
    return convert


def _distinct(walk: Walk, node: Node, path: str, values: list[Any]) -> list[Any]:
    """`values` with each repeat of an earlier item reported (and made INVALID)."""
    first: dict[Any, int] = {}
    for i, value in enumerate(values):
        if value is INVALID:
            continue
        if value in first:
            values[i] = walk.report(node.value[i], f"{path}[{i}]", f"names '{value}' more than once (first as "
                                    f"{path}[{first[value]}], line {line_of(node.value[first[value]])})")
        else:
            first[value] = i
    return values


def named(kind: str, section: Section, *name_checks: Check, non_empty: bool = False) -> Converter:
    """A mapping of name -> section, each name checked and defined as `kind` for references."""
    def convert(walk: Walk, node: Node, path: str) -> Any:
        entries = mapping_entries(walk, node, path)
        if entries is INVALID:
            return INVALID
        walk.defined.setdefault(kind, {})
        if non_empty and not entries:
            return walk.report(node, path, f"must define at least one {kind}")
        result = {}
        for name, (key_node, value_node) in entries.items():
            walk.define(kind, name, key_node, join(path, name))
            result[name] = section(walk, value_node, join(path, name), name=name)
            if message := next(filter(None, (check(name) for check in name_checks)), None):
                result[name] = walk.report(key_node, join(path, name), f"a {kind} name {message}")
        return INVALID if any(value is INVALID for value in result.values()) else result
    return convert


def definition(kind: str, *checks: Check, secret: bool = False) -> Converter:
    """A string that defines a name of `kind` (a second definition is an error; a `secret` one, an API key's hash,
    is not quoted in the problem: problems reach logs and the admin API)."""
    as_text = text(*checks)

    def convert(walk: Walk, node: Node, path: str) -> Any:
        name = as_text(walk, node, path)
        if name is not INVALID:
            walk.define(kind, name, node, path, quoted=not secret)
        return name
    return convert


def reference(kind: str) -> Converter:
    """A string naming something of `kind` defined elsewhere; checked after the walk."""
    as_text = text()

    def convert(walk: Walk, node: Node, path: str) -> Any:
        if isinstance(node, ScalarNode) and node.style is None and node.tag in (BOOL, INT, FLOAT):
            name = node.value   # as written, as the mapping key that defines it is read: `no:` names model 'no'
        else:
            name = as_text(walk, node, path)
        if name is not INVALID:
            walk.references.append((kind, name, node, path))
        return name
    return convert


def finite(value: Any) -> str | None:
    """Rejects .inf and .nan."""
    return None if math.isfinite(value) else f"must be a finite number, got {value}"
