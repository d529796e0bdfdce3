"""docs/config.md, generated from the config dataclasses: every key, its type, default and meaning (the
comment beside the field in sections.py, or the class docstring for a section).

    python -m opt_ds.config.reference > docs/config.md      (tests/test_config_reference.py keeps it current)
"""
from __future__ import annotations

import dataclasses
import inspect
import io
import tokenize
import typing

from opt_ds.config import sections
from opt_ds.config.sections import RunConfig

INTRO = """# Configuration reference

A run config is a YAML file of sections; every key is optional (the defaults below apply) and any key can be
overridden on the command line as `section.key=value` (a string key takes the text as written; `null` clears
an optional string; other keys are read as YAML, e.g. `data.train=[{path: corpus}]`). Unknown keys and wrong
types are errors. `opt-ds train CONFIG --print-config` prints the resolved config and the DeepSpeed JSON
generated from it; every run writes its resolved config to `<train.log_dir>/config.yaml`.

This page is generated from `opt_ds/config/sections.py` by `python -m opt_ds.config.reference`.
"""


def field_comments(cls) -> dict:
    """{field name: the comment at the end of its line} from the class source."""
    comments = {}
    source = inspect.getsource(cls)
    name = None
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.NAME and token.start[1] == 4 and name is None:
            name = token.string
        elif token.type == tokenize.COMMENT and name is not None:
            comments[name] = token.string.lstrip("# ").strip().replace("|", "\\|")   # a table cell
        if token.type in (tokenize.NEWLINE, tokenize.NL):
            name = None
    return comments


def type_name(annotation) -> str:
    if annotation is typing.Any:
        return "any"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union:
        inner = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(inner) + " or null"
    if origin in (list, typing.List):
        return f"list of {type_name(args[0])}"
    if dataclasses.is_dataclass(annotation):
        return f"`{annotation.__name__}`"
    return getattr(annotation, "__name__", str(annotation))


def default_text(field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
        if dataclasses.is_dataclass(value):
            return "(section)"
    else:
        return "required"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return f"`{value}`"


def section_table(prefix: str, cls) -> list:
    hints = typing.get_type_hints(cls, vars(sections))
    comments = field_comments(cls)
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    nested = []
    for field in dataclasses.fields(cls):
        annotation = hints[field.name]
        if dataclasses.is_dataclass(annotation) and field.default_factory is not dataclasses.MISSING:
            nested.append((f"{prefix}.{field.name}", annotation))
            rows.append(f"| `{prefix}.{field.name}` | section | | {comments.get(field.name, '')} (below) |")
            continue
        meaning = comments.get(field.name, "")
        rows.append(f"| `{prefix}.{field.name}` | {type_name(annotation)} | {default_text(field)} | {meaning} |")
    lines = [f"## `{prefix}`", ""]
    doc = inspect.getdoc(cls)
    if doc and not doc.startswith(cls.__name__ + "("):
        lines += [doc, ""]
    lines += rows + [""]
    for name, inner in nested:
        lines += section_table(name, inner)
    return lines


def reference() -> str:
    lines = [INTRO]
    hints = typing.get_type_hints(RunConfig, vars(sections))
    top_comments = field_comments(RunConfig)
    for field in dataclasses.fields(RunConfig):
        annotation = hints[field.name]
        if dataclasses.is_dataclass(annotation):
            lines += section_table(field.name, annotation)
        else:
            lines += [f"## `{field.name}`", "", f"{type_name(annotation)}, default {default_text(field)}: "
                      f"{top_comments.get(field.name, '')}", ""]
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    print(reference(), end="")
