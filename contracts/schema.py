"""JSON Schemas of the event contracts, their committed export, and a compatibility check.

``contracts/schemas/<Type>/v<N>.json`` is the schema each event version had when it shipped.
Files of older versions are history and never rewritten; ``check_compatible`` holds every one
of them against the current Struct, so a change that would stop an old event decoding fails
the contract tests. Refresh the export after changing an event::

    python -m contracts.schema contracts/schemas
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import msgspec

from contracts.envelope import Envelope
from contracts.events import EVENT_TYPES, Event

SCHEMA_FOLDER = Path(__file__).parent / "schemas"
ENVELOPE_SCHEMA_FILE = "envelope.json"
_VERSION_FILE = re.compile(r"^v(?P<version>[1-9][0-9]*)\.json$")


def event_schema(cls: type[Event]) -> dict[str, object]:
    """The JSON Schema of one event's body (msgspec's), tagged with its type and version."""
    schema: dict[str, object] = _tidy(msgspec.json.schema(cls))
    schema["x-event-type"] = cls.TYPE
    schema["x-event-version"] = cls.VERSION
    return schema


def envelope_schema() -> dict[str, object]:
    """The JSON Schema of the envelope, with ``data`` described as the event's body object."""
    schema: dict[str, Any] = _tidy(msgspec.json.schema(Envelope))
    properties = schema["$defs"]["Envelope"]["properties"]
    # msgspec.Raw has no schema of its own ({}): say what it holds.
    properties["data"] = {
        "type": "object",
        "description": "the event's body; its schema is <type>/v<version>.json",
    }
    return schema


def _tidy(schema: dict[str, Any]) -> dict[str, Any]:
    # msgspec copies docstrings verbatim; dedent them so the stored JSON reads cleanly.
    for definition in schema.get("$defs", {}).values():
        if "description" in definition:
            definition["description"] = inspect.cleandoc(definition["description"])
    return schema


def schema_path(folder: Path, cls: type[Event], version: int | None = None) -> Path:
    """Where the schema of ``cls`` at ``version`` (default: its current one) is stored."""
    return folder / cls.TYPE / f"v{cls.VERSION if version is None else version}.json"


def frozen_versions(folder: Path, type_name: str) -> dict[int, Path]:
    """The stored schema files of one event type, by version."""
    found: dict[int, Path] = {}
    directory = folder / type_name
    if directory.is_dir():
        for path in directory.iterdir():
            match = _VERSION_FILE.match(path.name)
            if match:
                found[int(match["version"])] = path
    return dict(sorted(found.items()))


def export_schemas(folder: Path, events: Iterable[type[Event]] | None = None) -> list[Path]:
    """Write every event's current schema and the envelope's under ``folder``; return the paths.

    Only the current version's file of each event is (re)written: files of older versions
    record what was emitted back then and are left as they are. ``events`` defaults to every
    registered event (tests pass their own).
    """
    written: list[Path] = []
    for cls in EVENT_TYPES.values() if events is None else events:
        path = schema_path(folder, cls)
        _write_json(path, event_schema(cls))
        written.append(path)
    path = folder / ENVELOPE_SCHEMA_FILE
    _write_json(path, envelope_schema())
    written.append(path)
    return written


def _write_json(path: Path, document: Mapping[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    path.write_text(text, encoding="utf-8")


# --- compatibility ------------------------------------------------------------------------------


def check_compatible(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """What would stop a payload valid under ``old`` from decoding under ``new``; [] if nothing.

    Reports, by field path: a field required in ``new`` that ``old`` did not require; a type
    that no longer accepts what it did (including a dropped ``null``, format, enum value, or a
    tightened bound); and ``new`` forbidding unknown fields. Removing a field is not reported:
    decoders ignore unknown fields. Understands msgspec's output: ``$ref`` into ``$defs``,
    ``anyOf`` for unions, ``enum`` without ``type`` for Literals.
    """
    problems: list[str] = []
    old_type, new_type = old.get("x-event-type"), new.get("x-event-type")
    if old_type is not None and new_type is not None and old_type != new_type:
        problems.append(f"(event): type renamed from {old_type!r} to {new_type!r}")
    checker = _Checker(old=_Document(old), new=_Document(new))
    problems.extend(checker.values(old, new, ""))
    return problems


@dataclass(frozen=True)
class _Alternative:
    """One branch of a (possibly union) schema, with the JSON kind it accepts."""

    kind: str  # a JSON Schema type name, or "any"
    node: Mapping[str, Any]
    ref: str | None


@dataclass(frozen=True)
class _Document:
    """One schema document: resolves its own ``$ref``s and splits unions."""

    root: Mapping[str, Any]

    def resolve(self, node: Mapping[str, Any]) -> tuple[Mapping[str, Any], str | None]:
        ref_name: str | None = None
        seen: set[str] = set()
        while "$ref" in node:
            ref = node["$ref"]
            if not isinstance(ref, str) or not ref.startswith("#/") or ref in seen:
                raise ValueError(f"cannot resolve $ref {ref!r}")
            seen.add(ref)
            ref_name = ref
            target: Any = self.root
            for part in ref[2:].split("/"):
                target = target[part.replace("~1", "/").replace("~0", "~")]
            siblings = {key: value for key, value in node.items() if key != "$ref"}
            node = {**target, **siblings}
        return node, ref_name

    def alternatives(self, node: Mapping[str, Any]) -> list[_Alternative]:
        node, ref = self.resolve(node)
        for union in ("anyOf", "oneOf"):
            if union in node:
                return [alt for branch in node[union] for alt in self.alternatives(branch)]
        kinds = node.get("type")
        if isinstance(kinds, str):
            return [_Alternative(kinds, node, ref)]
        if isinstance(kinds, list):
            return [_Alternative(kind, node, ref) for kind in kinds]
        values = node["enum"] if "enum" in node else [node["const"]] if "const" in node else None
        if values is None:
            return [_Alternative("any", node, ref)]
        by_kind: dict[str, list[Any]] = {}
        for value in values:
            by_kind.setdefault(_kind_of(value), []).append(value)
        base = {key: value for key, value in node.items() if key not in ("enum", "const")}
        return [_Alternative(kind, {**base, "enum": vs}, ref) for kind, vs in by_kind.items()]


def _kind_of(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _kind_accepts(new: str, old: str) -> bool:
    # msgspec decodes a JSON integer into a float field, not the other way round.
    return new == "any" or new == old or (new == "number" and old == "integer")


_LOWER_BOUNDS = ("minimum", "exclusiveMinimum", "minLength", "minItems", "minProperties")
_UPPER_BOUNDS = ("maximum", "exclusiveMaximum", "maxLength", "maxItems", "maxProperties")


@dataclass
class _Checker:
    """Walks an old and a new schema side by side, collecting what the new one rejects."""

    old: _Document
    new: _Document
    _active: set[tuple[str, str]] = field(default_factory=set)

    def values(self, old: Mapping[str, Any], new: Mapping[str, Any], path: str) -> list[str]:
        """Problems with any value ``old`` accepts that ``new`` would reject."""
        new_alts = self.new.alternatives(new)
        problems: list[str] = []
        for old_alt in self.old.alternatives(old):
            problems.extend(self._accepted(old_alt, new_alts, path))
        return problems

    def _accepted(self, old: _Alternative, new_alts: list[_Alternative], path: str) -> list[str]:
        best: list[str] | None = None
        for candidate in new_alts:
            if not _kind_accepts(candidate.kind, old.kind):
                continue
            found = self._same_kind(old, candidate, path)
            if not found:
                return []
            if best is None or len(found) < len(best):
                best = found
        if best is not None:
            return best
        now = " or ".join(_describe(alt) for alt in new_alts)
        return [f"{_at(path)}: type changed: accepted {_describe(old)}, now only {now}"]

    def _same_kind(self, old: _Alternative, new: _Alternative, path: str) -> list[str]:
        if new.kind == "any":
            return []
        pair = (old.ref, new.ref) if old.ref is not None and new.ref is not None else None
        if pair is not None:
            if pair in self._active:  # a recursive type, already being compared
                return []
            self._active.add(pair)
        try:
            problems = _narrowed(old.node, new.node, path)
            if new.kind == "object":
                problems.extend(self._objects(old.node, new.node, path))
            elif new.kind == "array":
                problems.extend(self._arrays(old.node, new.node, path))
            return problems
        finally:
            if pair is not None:
                self._active.discard(pair)

    def _objects(self, old: Mapping[str, Any], new: Mapping[str, Any], path: str) -> list[str]:
        problems: list[str] = []
        old_props: Mapping[str, Any] = old.get("properties", {})
        new_props: Mapping[str, Any] = new.get("properties", {})
        old_extra, new_extra = _extra(old), _extra(new)
        newly_required = set(new.get("required", ())) - set(old.get("required", ()))
        for name in sorted(newly_required):
            was = "optional" if name in old_props else "absent"
            problems.append(f"{_join(path, name)}: required now, but was {was}")
        for name, old_field in old_props.items():
            if name in new_props:
                problems.extend(self.values(old_field, new_props[name], _join(path, name)))
            elif new_extra is False:
                problems.append(f"{_join(path, name)}: removed while unknown fields are forbidden")
            elif new_extra is not None:
                problems.extend(self.values(old_field, new_extra, _join(path, name)))
        if isinstance(old_extra, Mapping):
            for name, new_field in new_props.items():
                if name not in old_props:
                    problems.extend(self.values(old_extra, new_field, _join(path, name)))
        if new_extra is False and old_extra is not False:
            problems.append(f"{_at(path)}: unknown fields are now forbidden")
        elif isinstance(new_extra, Mapping) and isinstance(old_extra, Mapping):
            problems.extend(self.values(old_extra, new_extra, f"{path}{{}}"))
        return problems

    def _arrays(self, old: Mapping[str, Any], new: Mapping[str, Any], path: str) -> list[str]:
        problems: list[str] = []
        old_prefix: Sequence[Any] = old.get("prefixItems", ())
        new_prefix: Sequence[Any] = new.get("prefixItems", ())
        for index, (old_item, new_item) in enumerate(zip(old_prefix, new_prefix, strict=False)):
            problems.extend(self.values(old_item, new_item, f"{path}[{index}]"))
        if len(new_prefix) > len(old_prefix):
            problems.append(f"{_at(path)}: tuple grew from {len(old_prefix)} items")
        if "items" in new:
            problems.extend(self.values(old.get("items", {}), new["items"], f"{path}[]"))
        return problems


def _narrowed(old: Mapping[str, Any], new: Mapping[str, Any], path: str) -> list[str]:
    """Constraints ``new`` adds or tightens on one value: enum, format, pattern, bounds."""
    problems: list[str] = []
    if "enum" in new:
        if "enum" not in old:
            problems.append(f"{_at(path)}: now restricted to {new['enum']!r}")
        else:
            dropped = [value for value in old["enum"] if value not in new["enum"]]
            if dropped:
                problems.append(f"{_at(path)}: no longer accepts {dropped!r}")
    for key in ("format", "pattern", "multipleOf"):
        if key in new and new[key] != old.get(key):
            problems.append(f"{_at(path)}: {key} changed from {old.get(key)!r} to {new[key]!r}")
    for key in _LOWER_BOUNDS:
        if key in new and (key not in old or new[key] > old[key]):
            problems.append(f"{_at(path)}: {key} raised from {old.get(key)!r} to {new[key]!r}")
    for key in _UPPER_BOUNDS:
        if key in new and (key not in old or new[key] < old[key]):
            problems.append(f"{_at(path)}: {key} lowered from {old.get(key)!r} to {new[key]!r}")
    return problems


def _extra(node: Mapping[str, Any]) -> Mapping[str, Any] | Literal[False] | None:
    """``False`` if unknown keys are forbidden, their schema if constrained, else ``None``."""
    extra = node.get("additionalProperties", True)
    if extra is False:
        return False
    if isinstance(extra, Mapping) and extra:
        return extra
    return None


def _describe(alt: _Alternative) -> str:
    if "enum" in alt.node:
        return f"{alt.kind} in {alt.node['enum']!r}"
    if alt.kind == "object" and "title" in alt.node:
        return f"object {alt.node['title']}"
    if "format" in alt.node:
        return f"{alt.kind} ({alt.node['format']})"
    return alt.kind


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _at(path: str) -> str:
    return path or "(top level)"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m contracts.schema [folder]``: export the schemas (default: the package's)."""
    parser = argparse.ArgumentParser(prog="python -m contracts.schema", description=__doc__)
    parser.add_argument("folder", nargs="?", type=Path, default=SCHEMA_FOLDER)
    args = parser.parse_args(argv)
    for path in export_schemas(args.folder):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
