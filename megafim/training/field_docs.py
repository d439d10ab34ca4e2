"""Field docstrings of a dataclass, read from its source, and a reference page of the trainer's settings.

Every config field in megafim carries its meaning as a string literal right below it (the attribute
docstring convention). ``field_docs`` reads those strings, so that the trainer's sections can reuse
the domain configs' documentation instead of restating it, and so that ``--help-config`` and
``docs/config_reference.md`` are generated from the one definition of each setting.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import typing


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """``{field name: its docstring}`` for a dataclass defined in a source file (inherited fields too)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):  # made at run time (make_dataclass): docs live in field metadata
            continue
        body = ast.parse(source).body[0].body
        for node, after in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and \
                    isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) and \
                    isinstance(after.value.value, str):
                docs[node.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    for f in dataclasses.fields(cls):
        if "doc" in f.metadata:
            docs[f.name] = f.metadata["doc"]
    return docs


def _type_name(tp: typing.Any) -> str:
    args = typing.get_args(tp)
    if type(None) in args:  # Optional[X]: "X or null"
        inner = [a for a in args if a is not type(None)]
        return " or ".join(_type_name(a) for a in inner) + " or null"
    return getattr(tp, "__name__", str(tp))


def _default(f: dataclasses.Field) -> typing.Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        return None if dataclasses.is_dataclass(value) else value
    return None


def reference_rows(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted name, type, default, meaning) of every leaf field below ``cls``, in definition order."""
    rows = []
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows += reference_rows(tp, f"{prefix}{f.name}.")
            continue
        choices = f.metadata.get("choices")
        meaning = docs.get(f.name, "")
        if choices:
            meaning += f" One of: {', '.join(map(str, choices))}."
        default = _default(f)
        rows.append((prefix + f.name, _type_name(tp), "" if default is None else repr(default), meaning))
    return rows


def reference_markdown(cls: type, flags: dict[str, str]) -> str:
    """The reference page: one table per section; ``flags`` maps a dotted name to its command-line flag."""
    out = ["# Trainer settings", "",
           "Generated from the config dataclasses by `python -m megafim.train --help-config --markdown`;",
           "do not edit by hand (a test checks that it is current). Every setting can be given in the",
           "YAML file (`--config`), as `--set section.field=VALUE`, and the common ones as Megatron-style",
           "flags. An empty default under `model` means the named size's value."]
    section = None
    for name, tp, default, meaning in reference_rows(cls):
        head = name.split(".")[0] if "." in name else "(top level)"
        if head != section:
            section = head
            out += ["", f"## {section}", "", "| setting | flag | type | default | meaning |",
                    "| --- | --- | --- | --- | --- |"]
        flag = f"`{flags[name]}`" if name in flags else ""
        cell = meaning.replace("|", "\\|")
        out.append(f"| `{name}` | {flag} | {tp} | {default.replace('|', '/')} | {cell} |")
    return "\n".join(out) + "\n"


def reference_text(cls: type, flags: dict[str, str]) -> str:
    """The same as plain text for the terminal (``--help-config``)."""
    lines = []
    for name, tp, default, meaning in reference_rows(cls):
        flag = f"  [{flags[name]}]" if name in flags else ""
        lines.append(f"{name} ({tp}, default {default or '-'}){flag}")
        lines += textwrap.wrap(meaning, width=100, initial_indent="    ", subsequent_indent="    ")
    return "\n".join(lines) + "\n"
