"""docs/report-schema.md as data: the objects and fields its tables document, and a check
that a JSON object has exactly those fields, of those types (for the report tests of every
folder)."""
from __future__ import annotations

import re
from pathlib import Path

SCHEMA_DOC = Path(__file__).resolve().parents[1] / "docs" / "report-schema.md"


def documented() -> dict[str, dict[str, str]]:
    """object name -> {field: type} from the tables of docs/report-schema.md."""
    objects: dict[str, dict[str, str]] = {}
    current = None
    for line in SCHEMA_DOC.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^## Object: `(\w+)`", line)
        if m:
            current = objects.setdefault(m.group(1), {})
            continue
        if line.startswith("## "):
            current = None
        m = re.match(r"^\| `([\w-]+)` \| ([a-z ]+) \|", line)
        if m and current is not None:
            current[m.group(1)] = m.group(2).strip()
    return objects


def type_ok(value, spec: str) -> bool:
    alts = spec.split(" or ")
    for t in alts:
        if t == "null" and value is None:
            return True
        if t == "string" and isinstance(value, str):
            return True
        if t == "integer" and isinstance(value, int) and not isinstance(value, bool):
            return True
        if t == "boolean" and isinstance(value, bool):
            return True
        if t == "float" and ((isinstance(value, (int, float)) and not isinstance(value, bool))
                             or value in ("nan", "inf", "-inf")):
            return True
        if t == "object" and isinstance(value, dict):
            return True
        if t == "array" and isinstance(value, list):
            return True
    return False


def optional(spec: str) -> bool:
    """A field documented as ``... or absent``: it may be left out."""
    return "absent" in spec.split(" or ")


def validate(obj, name: str, doc: dict) -> None:
    """``obj`` has the documented fields of ``name``, in order (those ``... or absent``
    only where present), each of its documented type."""
    fields = doc[name]
    assert isinstance(obj, dict), name
    wanted = [k for k, spec in fields.items() if k in obj or not optional(spec)]
    assert list(obj) == wanted, f"{name}: fields {list(obj)} vs documented {wanted}"
    for key in wanted:
        assert type_ok(obj[key], fields[key]), f"{name}.{key} = {obj[key]!r} is not {fields[key]}"
