"""The vocabulary of the configuration schema (allconv.schema): field rules whose failure is one line naming the key,
and the reading of pydantic's errors back into that line."""

import re
import typing
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, ValidationError, WrapValidator
from pydantic_core import PydanticCustomError


# -- the vocabulary of rules -------------------------------------------------------------------------
def shown(value: Any) -> str:
    """A value as it is written on the command line (true, null, [1, 2], a string unquoted)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(shown, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {shown(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str):
        return value if value and not re.search(r"[\s,'\"]", value) else repr(value)
    return repr(value)


class Allowed(str):
    """What a key accepts, as its error says it (`must be <this>`); kept in the field's metadata."""


def _refuse_with(text: str):
    def check(value, handler):
        try:
            return handler(value)
        except ValidationError:  # pydantic's own wording names types, not what the user can write
            raise PydanticCustomError("allowed", "must be {allowed}", {"allowed": text}) from None

    return WrapValidator(check)


def rule(tp: Any, allowed: str, null: str | None = None) -> Any:
    """tp, refused with `must be <allowed>`; null: what null means for this key (None: null is refused)."""
    text = allowed if null is None else f"{allowed} (or null for {null})"
    return Annotated[tp | None if null is not None else tp, _refuse_with(text), Allowed(text)]


def whole(ge: int, le: int | None = None, null: str | None = None) -> Any:
    text = f"a whole number >= {ge}" if le is None else f"a whole number in {ge}..{le}"
    return rule(Annotated[int, Field(ge=ge, le=le)], text, null)


def number(text: str, null: str | None = None, **bounds) -> Any:
    return rule(Annotated[float, Field(allow_inf_nan=False, **bounds)], text, null)


def one_of(*values, text: str | None = None, null: str | None = None) -> Any:
    return rule(Literal[values], text or "one of: " + ", ".join(dict.fromkeys(map(shown, values))), null)


def string(what: str, null: str | None = None) -> Any:
    return rule(str, what, null)


def broken(key: str, value: Any, message: str) -> PydanticCustomError:
    """A rule over several keys: the one line names the key to change, its value and why."""
    return PydanticCustomError("rule", "{message}", {"key": key, "value": value, "message": message})


def _at(container: Any, key: str) -> Any:
    for part in re.findall(r"[^.\[\]]+", key):
        try:
            container = container[int(part)] if isinstance(container, list) else container[part]
        except (KeyError, IndexError, ValueError, TypeError):
            return None
    return container


def describe(error: dict, schema: type[BaseModel]) -> str:
    """One pydantic error as its line: `<dotted key>=<value>: <what is allowed>`."""
    if error["type"] == "rule":
        ctx = error["ctx"]
        return f"{ctx['key']}={shown(ctx['value'])}: {ctx['message']}"
    key, owner = _locate(schema, error["loc"])
    name = key.rsplit(".", 1)[-1]
    if error["type"] == "allowed":
        return f"{key}={shown(error['input'])}: must be {error['ctx']['allowed']}"
    if error["type"] == "extra_forbidden":
        section = key.rpartition(".")[0] or "the config"
        return f"{key}={shown(error['input'])}: unknown key; {section} has: {', '.join(owner.model_fields)}"
    if error["type"] == "missing":
        field = _field(schema, key)
        return f"{key} is not set; must be {_allowed(field) if field else 'set'}"
    if error["type"].startswith("union_tag"):  # a discriminated section: the key that picks its form
        ctx = error["ctx"]
        tag = ctx["discriminator"].strip("'")
        return f"{key}.{tag}={shown(ctx.get('tag'))}: must be one of: {ctx['expected_tags'].replace(chr(39), '')}"
    if error["type"] in ("model_type", "model_attributes_type", "dict_type") and owner is not None:
        sub = _nested(owner.model_fields[name].annotation)
        keys = sub.model_fields if isinstance(sub, type) else sorted({k for m in sub.values() for k in m.model_fields})
        return f"{key}={shown(error['input'])}: must be a section with the keys {', '.join(keys)}"
    return f"{key}={shown(error.get('input'))}: {error['msg']}"


def _nested(annotation: Any) -> type[BaseModel] | dict[str, type[BaseModel]] | None:
    """The section a field holds: a model, {tag: model} for a discriminated union, or None for a value."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    members = [m for m in typing.get_args(annotation) if isinstance(m, type) and issubclass(m, BaseModel)]
    if members:
        return {typing.get_args(m.model_fields["kind"].annotation)[0]: m for m in members}
    return None


def _locate(schema: type[BaseModel], loc: tuple) -> tuple[str, type[BaseModel] | None]:
    """The dotted key of an error's loc (pydantic's union tags dropped) and the model holding its last key."""
    parts: list[str] = []
    holder: Any = schema
    owner = None
    for part in loc:
        if isinstance(holder, dict):  # the loc names the union member by its tag
            holder = holder.get(part)
            continue
        parts.append(str(part))
        owner = holder
        field = holder.model_fields.get(part) if holder is not None else None
        holder = _nested(field.annotation) if field is not None else None
    return ".".join(parts), owner


def _field(schema: type[BaseModel], key: str):
    """The field that declares a dotted key (in any form of a discriminated section), or None."""
    holder: Any = schema
    field = None
    for part in key.split("."):
        forms = [holder] if isinstance(holder, type) else list((holder or {}).values())
        field = next((m.model_fields[part] for m in forms if part in m.model_fields), None)
        if field is None:
            return None
        holder = _nested(field.annotation)
    return field


def _allowed(field) -> str | None:
    return next((m for m in field.metadata if isinstance(m, Allowed)), None)


def declared(schema: type[BaseModel], prefix: str = "") -> set[str]:
    """Every key schema declares, dotted; a discriminated section declares the keys of all its forms."""
    keys: set[str] = set()
    for name, field in schema.model_fields.items():
        sub = _nested(field.annotation)
        if sub is None:
            keys.add(prefix + name)
        for model in [sub] if isinstance(sub, type) else (sub or {}).values():
            keys |= declared(model, f"{prefix}{name}.")
    return keys
