"""YAML/JSON text -> a validated `Config`, or a `ConfigError` listing every problem.

Raw dicts from the file stop here. Pydantic's errors are rewritten into one plain
`path: message` line each, and the whole-config checks run over the raw data even when
some fields failed, so a user fixes a file in one pass instead of one error at a time.
"""
from __future__ import annotations

import os
from typing import Any, NamedTuple, get_args

import yaml
from pydantic import BaseModel, ValidationError

from .model import (
    FROM_TEXT,
    SEMANTIC,
    Config,
    describe,
    format_path,
    semantic_problems,
    suggest,
)


class FieldError(NamedTuple):
    path: str  # e.g. "listeners[1].routes[0].match.prefix"; "" for the file as a whole
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class ConfigError(Exception):
    """Every problem found in one config, each with the field path it belongs to."""

    def __init__(self, errors: list[FieldError], source: str = "<config>") -> None:
        super().__init__(errors, source)  # keeps the error picklable
        self.errors = list(errors)
        self.source = source

    def __str__(self) -> str:
        return "\n".join(f"{e.path or self.source}: {e.message}" for e in self.errors)


def load_config(path: str | os.PathLike[str]) -> Config:
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as file:
            text = file.read()
    except OSError as exc:
        problem = f"cannot read config file: {exc.strerror or exc}"
    except UnicodeDecodeError as exc:
        problem = f"config file is not valid UTF-8 (byte {exc.start})"
    else:
        return parse_config(text, source)
    raise ConfigError([FieldError("", problem)], source)


def parse_config(text: str, source: str = "<config>") -> Config:
    data = _parse_yaml(text, source)
    if data is None:
        raise ConfigError([FieldError("", "config is empty")], source)
    try:
        return Config.model_validate(data, context=FROM_TEXT)
    except ValidationError as exc:
        found = exc.errors(include_url=False)
        errors = [FieldError(format_path(e["loc"]), _message(e)) for e in found if _reportable(e)]
        # Config runs its whole-file checks only once every field is valid.
        if not any(e["type"] == SEMANTIC for e in found):
            errors += [FieldError(format_path(loc), msg) for loc, msg in semantic_problems(data)]
        raise ConfigError(errors, source) from None


def config_to_dict(config: Config) -> dict[str, Any]:
    """JSON-ready, in the file's shape: durations like "250ms", addresses as "host:port"."""
    return config.model_dump(mode="json", exclude_none=True)


# -- YAML ------------------------------------------------------------------------------------

_BaseLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


_BOOL_TAG = "tag:yaml.org,2002:bool"
_STR_TAG = "tag:yaml.org,2002:str"


class _Loader(_BaseLoader):  # type: ignore[misc, valid-type]
    """Safe loading that rejects a key given twice in one mapping (YAML keeps the last silently)
    and reads a key such as `on` or `no` as the word it is, not as a YAML 1.1 boolean."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            if _is_yaml11_bool_word(key_node):
                key_node.tag = _STR_TAG
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str):
                continue  # the base class rejects unhashable keys; other scalars are rare
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _is_yaml11_bool_word(node: yaml.Node) -> bool:
    """`on`, `off`, `yes`, `no`: booleans to YAML 1.1 only, field names to us."""
    return (
        isinstance(node, yaml.ScalarNode)
        and node.tag == _BOOL_TAG
        and not node.style  # plain: None from the Python parser, "" from the C one
        and node.value.lower() not in ("true", "false")
    )


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError([FieldError("", f"invalid YAML{where}: {exc.problem}")], source) from None
    except yaml.YAMLError as exc:
        raise ConfigError([FieldError("", f"invalid YAML: {exc}")], source) from None


# -- pydantic errors -> plain messages -------------------------------------------------------

# Pydantic's wording names Python types ("a valid tuple"); say what the file should hold.
_TYPE_MESSAGES = {
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "string_type": "must be a string",
    "bool_type": "must be true or false",
    "tuple_type": "must be a list",
    "list_type": "must be a list",
    "model_type": "must be a mapping",
    "dict_type": "must be a mapping",
}


def _reportable(error: Any) -> bool:
    # Pydantic counts only the items that validated, so a list whose items all failed is
    # also "too short"; the items' own errors already say what is wrong.
    return not (error["type"] == "too_short" and error["input"])


def _message(error: Any) -> str:
    kind, value = error["type"], error.get("input")
    if kind == "missing":
        return "required field missing"
    if kind == "extra_forbidden":
        return "unknown field" + suggest(str(error["loc"][-1]), _fields_at(error["loc"][:-1]))
    if kind in ("too_short", "string_too_short"):
        return "must not be empty"
    if kind in _TYPE_MESSAGES:
        return f"{_TYPE_MESSAGES[kind]}, got {describe(value)}"
    if error["msg"].startswith("Input should be "):  # constraints: "... greater than 0", literals
        return f"must be {error['msg'].removeprefix('Input should be ')}, got {describe(value)}"
    return error["msg"]  # our own validators' messages, already plain


def _fields_at(loc: tuple) -> list[str]:
    """Field names of the model found at `loc`, to suggest a fix for a misspelt key."""
    model: type[BaseModel] | None = Config
    for part in loc:
        if isinstance(part, str) and model is not None:
            field = _by_file_name(model).get(part)
            model = _model_in(field.annotation) if field else None
    return list(_by_file_name(model)) if model else []


def _by_file_name(model: type[BaseModel]) -> dict[str, Any]:
    """A model's fields by the name the file uses (the alias, e.g. `from`, where one is set)."""
    return {field.alias or name: field for name, field in model.model_fields.items()}


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        if found := _model_in(arg):
            return found
    return None

