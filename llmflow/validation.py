"""Short, field-named messages for a config that does not validate.

pydantic's own text names internal things a user never wrote: the union member's tag in the
path (``engine.llama_cpp.n_ctxx``), the discriminator function (``Input tag 'slrum' found using
pick()``) and class names (``instance of LocalPlacement``). ``config_problems`` turns each error
into one line in the user's terms, with a "did you mean" where a name is close to a real one.
"""

from __future__ import annotations

import difflib
import re
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError


def did_you_mean(word: str, choices: list[str] | tuple[str, ...]) -> str:
    """``; did you mean 'x'?`` when ``word`` is close to one of ``choices``, else ``""``."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _tagged_members(annotation: Any) -> dict[str, type[BaseModel]] | None:
    """``{tag: model}`` for a discriminated union such as ``config.Engine`` (a field's annotation
    is the bare union of tagged members); None otherwise."""
    union = get_args(annotation)[0] if get_origin(annotation) is Annotated else annotation
    if get_origin(union) is not Union:
        return None
    members: dict[str, type[BaseModel]] = {}
    for member in get_args(union):
        if get_origin(member) is not Annotated:
            return None
        model, *extras = get_args(member)
        tag = next((getattr(e, "tag", None) for e in extras if hasattr(e, "tag")), None)
        if tag is None:
            return None
        members[tag] = model
    return members


def _inner(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """The model inside ``X | None``, ``list[X]`` or ``dict[str, X]``, and whether the next
    location element is a dict key (``secret_env.HF_TOKEN``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is dict and len(args) == 2:
        return _inner(args[1])[0], True
    for arg in args:
        model, _ = _inner(arg)
        if model is not None:
            return model, False
    return None, False


def _walk(root: type[BaseModel], loc: tuple[Any, ...]) -> tuple[list[str], type[BaseModel] | None]:
    """The location as the user wrote it (union tags dropped, list indexes as ``[i]``) and the
    model that owns its last element."""
    path: list[str] = []
    model: type[BaseModel] | None = root
    owner: type[BaseModel] | None = root
    items = list(loc)
    while items:
        key = items.pop(0)
        if isinstance(key, int) and path:
            path[-1] += f"[{key}]"
            continue
        path.append(str(key))
        owner = model
        field = model.model_fields.get(str(key)) if model is not None else None
        if field is None:
            model = None
            continue
        members = _tagged_members(field.annotation)
        if members is not None:
            model = members.get(items.pop(0)) if items and items[0] in members else None
            continue
        model, keyed = _inner(field.annotation)
        if keyed and items:
            path.append(str(items.pop(0)))
    return path, owner


def _one(root: type[BaseModel], error: dict[str, Any], prefix: str) -> str:
    path, owner = _walk(root, tuple(error["loc"]))
    where = prefix + ".".join(path)
    kind = error["type"]
    if kind == "union_tag_invalid":
        ctx = error.get("ctx") or {}
        tags = re.findall(r"'([^']*)'", str(ctx.get("expected_tags", "")))
        tag = str(ctx.get("tag", ""))
        return f"{where}.kind: unknown kind {tag!r}{did_you_mean(tag, tags)} (one of {', '.join(tags)})"
    if kind == "extra_forbidden" and path:
        known = list(owner.model_fields) if owner is not None else []
        return f"{where}: unknown key{did_you_mean(path[-1], known)}"
    message = re.sub(r"^Value error, | or instance of \w+| for <class '[^']*'>", "", error["msg"])
    if where and message.startswith((where + ":", ".".join(path) + ":")):  # a validator that names its field
        return message if message.startswith(where) else prefix + message
    return f"{where}: {message}" if where else message


def config_problems(exc: ValidationError, root: type[BaseModel], prefix: str = "") -> list[str]:
    """One line per error of ``exc`` (raised validating ``root``), each starting with the field's
    path under ``prefix`` (``session.``)."""
    return [_one(root, error, prefix) for error in exc.errors(include_url=False)]


def short_message(problems: list[str], limit: int = 2) -> str:
    """At most ``limit`` problems and a count of the rest: a message that fits a terminal."""
    shown = problems[:limit]
    if len(problems) > limit:
        shown.append(f"(and {len(problems) - limit} more)")
    return "\n".join(shown)
