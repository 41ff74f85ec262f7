"""An edit form generated from a tool's argument JSON schema, and its parsing back to args.

The form only shapes the input; the queue validates the edited arguments against the tool's
schema (server-side) when the decision is applied. Parsing here turns the form's strings into
JSON values by the schema's declared types, and reports what cannot be converted by field.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

ARG_PREFIX = "arg."


@dataclass(frozen=True)
class FormField:
    """One input of the edit form."""

    name: str
    """The argument's name."""
    kind: str
    """``text``, ``textarea``, ``integer``, ``number``, ``boolean``, ``select`` or ``json``."""
    value: str
    """The current value, as the input shows it."""
    required: bool
    """Whether the schema requires the argument."""
    description: str = ""
    """The schema's description of the argument."""
    options: tuple[str, ...] = ()
    """The choices of a ``select`` (an ``enum``)."""

    @property
    def input_name(self) -> str:
        """The form control's name."""
        return ARG_PREFIX + self.name


def _type_of(prop: Mapping[str, Any]) -> str | None:
    t = prop.get("type")
    if isinstance(t, list):
        non_null = [x for x in t if x != "null"]
        t = non_null[0] if len(non_null) == 1 else None
    if t is None and "anyOf" in prop:
        types = [p.get("type") for p in prop["anyOf"] if isinstance(p, Mapping)]
        non_null = [x for x in types if x not in (None, "null")]
        t = non_null[0] if len(non_null) == 1 else None
    return t if isinstance(t, str) else None


def _infer_schema(args: Mapping[str, Any]) -> dict[str, Any]:
    """A schema from current values, for tools that declare none."""
    props: dict[str, Any] = {}
    for name, value in args.items():
        if isinstance(value, bool):
            props[name] = {"type": "boolean"}
        elif isinstance(value, int):
            props[name] = {"type": "integer"}
        elif isinstance(value, float):
            props[name] = {"type": "number"}
        elif isinstance(value, str):
            props[name] = {"type": "string"}
        else:
            props[name] = {}
    return {"type": "object", "properties": props, "required": list(args)}


def form_fields(schema: Mapping[str, Any] | None, args: Mapping[str, Any]) -> list[FormField]:
    """The edit form's fields for a tool call: one per schema property, filled with *args*.

    Arguments the schema does not list still get a (JSON) field, so nothing the agent
    proposed is hidden from the reviewer.
    """
    schema = schema if schema and schema.get("properties") else _infer_schema(args)
    props: Mapping[str, Any] = schema.get("properties", {})
    required = set(schema.get("required", []))
    names = list(props) + [n for n in args if n not in props]
    fields = []
    for name in names:
        prop = props.get(name, {})
        prop = prop if isinstance(prop, Mapping) else {}
        value = args.get(name, prop.get("default"))
        t = _type_of(prop)
        desc = str(prop.get("description", ""))
        if isinstance(prop.get("enum"), list):
            opts = tuple(json.dumps(o) if not isinstance(o, str) else o for o in prop["enum"])
            shown = value if isinstance(value, str) else json.dumps(value)
            fields.append(FormField(name, "select", shown, name in required, desc, opts))
        elif t == "boolean":
            fields.append(
                FormField(name, "boolean", "true" if value else "false", name in required, desc)
            )
        elif t in ("integer", "number") and not isinstance(value, bool | dict | list):
            shown = "" if value is None else str(value)
            fields.append(FormField(name, t, shown, name in required, desc))
        elif t == "string" and (value is None or isinstance(value, str)):
            shown = value or ""
            kind = "textarea" if len(shown) > 80 or "\n" in shown else "text"
            fields.append(FormField(name, kind, shown, name in required, desc))
        else:
            shown = "" if value is None else json.dumps(value, indent=2, ensure_ascii=False)
            fields.append(FormField(name, "json", shown, name in required, desc))
    return fields


class FormError(ValueError):
    """Some fields of a submitted edit form could not be read (field → problem)."""

    def __init__(self, problems: dict[str, str]) -> None:
        super().__init__(problems)
        self.problems = problems

    def __str__(self) -> str:
        return "; ".join(f"{k}: {v}" for k, v in self.problems.items())


def parse_form(
    schema: Mapping[str, Any] | None, args: Mapping[str, Any], form: Mapping[str, str]
) -> dict[str, Any]:
    """Turn a submitted edit form back into tool arguments.

    Raises:
        FormError: a value that does not convert to its declared type.
    """
    out: dict[str, Any] = {}
    problems: dict[str, str] = {}
    for f in form_fields(schema, args):
        raw = form.get(f.input_name)
        if f.kind == "boolean":
            out[f.name] = raw == "true"
            continue
        if raw is None or (raw.strip() == "" and f.kind != "text" and f.kind != "textarea"):
            if f.required:
                problems[f.name] = "a value is required"
            continue
        try:
            if f.kind == "integer":
                out[f.name] = int(raw.strip())
            elif f.kind == "number":
                num = float(raw.strip())
                out[f.name] = int(num) if num.is_integer() and "." not in raw else num
            elif f.kind == "json":
                out[f.name] = json.loads(raw)
            elif f.kind == "select":
                out[f.name] = (
                    raw
                    if raw in f.options and _enum_is_str(schema, f.name)
                    else (json.loads(raw) if raw in f.options else raw)
                )
            else:
                out[f.name] = raw.replace("\r\n", "\n")
        except ValueError as e:
            problems[f.name] = f"not a valid {f.kind}: {str(e).splitlines()[0]}"
        except RecursionError:
            problems[f.name] = f"not a valid {f.kind}: nested too deep"
    if problems:
        raise FormError(problems)
    return out


def _enum_is_str(schema: Mapping[str, Any] | None, name: str) -> bool:
    prop = (schema or {}).get("properties", {}).get(name, {})
    return all(isinstance(o, str) for o in prop.get("enum", []))
