"""YAML loading with the line and column of every node, and ``${VAR}`` interpolation.

``${VAR}`` and ``${VAR:-default}`` take the process environment first, then the workflow's
``environment:`` block (whose own values may refer to the process environment);
``${file:/run/secrets/pg}`` is the content of a file (a Kubernetes or Docker secret, always
treated as a secret); ``$$`` is a literal ``$``. Interpolated values are remembered by
location so that error messages show the ``${VAR}`` text, never the (possibly secret) value.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dataflare import secrets
from dataflare.dsl_compiler.problems import Loc, Problem, format_loc

_VAR = re.compile(r"\$\$|\$\{(?:file:([^}]+)|([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?)\}")


@dataclass
class Document:
    """A loaded YAML document: plain data plus where each node stands in the file."""

    file: str
    data: Any
    positions: dict[Loc, tuple[int, int]] = field(default_factory=dict)
    key_positions: dict[Loc, tuple[int, int]] = field(default_factory=dict)
    templates: dict[Loc, str] = field(default_factory=dict)
    styles: dict[Loc, str | None] = field(default_factory=dict)
    """The style of each scalar: ``None`` plain, ``'`` or ``"`` quoted, ``|`` or ``>`` block."""
    problems: list[Problem] = field(default_factory=list)
    substituted: dict[str, str] = field(default_factory=dict)
    """Each variable's value and its ``${NAME}``: messages show the name, never the value."""

    def position(self, loc: Loc, key: bool = False) -> tuple[int, int]:
        """Line and column of the node at ``loc`` (or of its nearest enclosing node)."""
        table = self.key_positions if key else self.positions
        for end in range(len(loc), -1, -1):
            pos = table.get(loc[:end]) or self.positions.get(loc[:end])
            if pos:
                return pos
        return (1, 1)

    def problem(self, loc: Loc, message: str, key: bool = False, **kw: Any) -> Problem:
        """A problem located at ``loc``; the printed path leaves out the ``workflow`` root."""
        line, col = self.position(loc, key)
        shown = loc[1:] if loc[:1] == ("workflow",) else loc
        for value, name in self.substituted.items():
            message = message.replace(value, name)
        return Problem(self.file, line, col, format_loc(shown), message, **kw)

    def column_of(self, loc: Loc, offset: int) -> int | None:
        """The file column of character ``offset`` (1-based) of the one-line scalar at ``loc``.

        ``None`` when it cannot be told: a block or multi-line scalar, an escape or a
        ``${VAR}`` before it.
        """
        if loc not in self.positions or loc in self.templates:
            return None
        value: Any = self.data
        for part in loc:
            try:
                value = value[part]
            except (KeyError, IndexError, TypeError):
                return None
        style = self.styles.get(loc, "|")
        if (not isinstance(value, str) or "\n" in value or style not in (None, "'", '"')
                or (style == "'" and "'" in value)
                or (style == '"' and ('"' in value or "\\" in value))):
            return None  # the text in the file is not the value character for character
        return self.positions[loc][1] + offset - 1 + (0 if style is None else 1)

    def move(self, old: Loc, new: Loc) -> None:
        """Record that the subtree at ``old`` now stands at ``new`` (a normalized placement)."""
        tables: tuple[dict[Loc, Any], ...] = (self.positions, self.key_positions, self.templates,
                                             self.styles)
        for table in tables:
            for loc in [k for k in table if k[: len(old)] == old]:
                table[new + loc[len(old) :]] = table[loc]


class _Builder:
    def __init__(self, doc: Document) -> None:
        self.doc = doc
        self.constructor = yaml.SafeLoader("")

    def build(self, node: yaml.Node, loc: Loc) -> Any:
        self.doc.positions[loc] = (node.start_mark.line + 1, node.start_mark.column + 1)
        if isinstance(node, yaml.MappingNode):
            out: dict[Any, Any] = {}
            merged_keys: set[Any] = set()  # from `<<: *anchor`: a key given here overrides
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    merged = self.build(value_node, loc)
                    for item in merged if isinstance(merged, list) else [merged]:
                        if isinstance(item, dict):
                            for k, v in item.items():
                                if k not in out:
                                    out[k] = v
                                    merged_keys.add(k)
                    continue
                key = self.constructor.construct_object(key_node)
                if not isinstance(key, str | int | float | bool) or key is None:
                    key = str(key)
                key = str(key) if not isinstance(key, str) else key
                child = (*loc, key)
                key_pos = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
                if key in merged_keys:  # YAML's merge: the key given here wins
                    merged_keys.discard(key)
                elif key in out:
                    first = self.doc.key_positions[child]
                    self.doc.key_positions[child] = key_pos
                    self.doc.problems.append(
                        self.doc.problem(
                            child, f"duplicate key {key!r} (first at line {first[0]})", key=True
                        )
                    )
                self.doc.key_positions[child] = key_pos
                out[key] = self.build(value_node, child)
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, (*loc, i)) for i, item in enumerate(node.value)]
        if isinstance(node, yaml.ScalarNode):
            self.doc.styles[loc] = node.style
        return self.constructor.construct_object(node)


_UNQUOTED_VARIABLE = re.compile(r"""[{\[,]\s*[^'"\s{\[,][^'",{}\[\]]*\$\{|[:{\[,]\s*\$\{""")
"""A ``${VAR}`` not in quotes after a flow collection's ``{``, ``[``, ``,`` or ``:``."""


def parse(text: str, file: str) -> Document:
    """Parse YAML ``text``; syntax errors become problems of the document."""
    doc = Document(file=file, data=None)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        reason = exc.problem or str(exc)
        lines = text.splitlines()
        if mark and mark.line < len(lines) and _UNQUOTED_VARIABLE.search(lines[mark.line]):
            reason += (" (inside { } or [ ], a ${VAR} must be quoted: "
                       "\"${VAR}\" or 'out/${VAR}.jsonl')")
        doc.problems.append(Problem(file, line, col, "workflow", f"invalid YAML: {reason}"))
        return doc
    except yaml.YAMLError as exc:
        doc.problems.append(Problem(file, 1, 1, "workflow", f"invalid YAML: {exc}"))
        return doc
    doc.data = {} if node is None else _Builder(doc).build(node, ())
    return doc


def interpolate(doc: Document, env: Mapping[str, str] | None = None) -> None:
    """Replace ``${VAR}`` references in every string of ``doc``, in place.

    An unset variable without a default is a problem that stops a run (``validate``
    reports it as a warning: the variable may be set where the workflow runs).
    """
    process = dict(os.environ if env is None else env)
    wf = doc.data.get("workflow") if isinstance(doc.data, dict) else None
    block = wf.get("environment") if isinstance(wf, dict) else None
    declared: dict[str, str] = {}
    if isinstance(block, dict):
        for name, value in block.items():
            loc: Loc = ("workflow", "environment", name)
            block[name] = _substitute(doc, value, loc, process)
            declared[str(name)] = "" if block[name] is None else str(block[name])
    merged = {**declared, **process}
    doc.data = _walk(doc, doc.data, (), merged)


def _walk(doc: Document, value: Any, loc: Loc, env: Mapping[str, str]) -> Any:
    if isinstance(value, dict):
        if loc == ("workflow",):
            return {
                k: (v if k == "environment" else _walk(doc, v, (*loc, k), env))
                for k, v in value.items()
            }
        return {k: _walk(doc, v, (*loc, k), env) for k, v in value.items()}
    if isinstance(value, list):
        return [_walk(doc, v, (*loc, i), env) for i, v in enumerate(value)]
    return _substitute(doc, value, loc, env)


def _substitute(doc: Document, value: Any, loc: Loc, env: Mapping[str, str]) -> Any:
    if not isinstance(value, str) or "$" not in value:
        return value

    def repl(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        if m.group(1) is not None:
            return _file_secret(doc, m.group(1), m.group(0), loc)
        name, default = m.group(2), m.group(3)
        if name in env:
            if len(env[name]) >= 4:  # shorter values would blot out ordinary text
                doc.substituted[env[name]] = f"${{{name}}}"
            if secrets.SECRET_KEY.search(name):
                secrets.register_field(name, env[name])
            elif secrets.in_credentials(value, m.start()):
                secrets.register(env[name])  # ${PGPASS} in "password=${PGPASS}"
            return env[name]
        if default is not None:
            return default
        doc.problems.append(
            doc.problem(
                loc,
                f"variable {name} is not set (use ${{{name}:-default}} for a default)",
                severity="warning",
                at_run=True,
            )
        )
        return m.group(0)

    out = _VAR.sub(repl, value)
    if out != value:
        doc.templates[loc] = value
    return out


def _file_secret(doc: Document, path: str, text: str, loc: Loc) -> str:
    """The content of a secret file (``${file:/run/secrets/pg}``), without its final newline."""
    try:
        value = Path(path.strip()).read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        doc.problems.append(
            doc.problem(loc, f"cannot read secret file {path.strip()!r}: {exc.strerror}",
                        severity="warning", at_run=True)
        )
        return text
    secrets.register(value)
    if len(value) >= 4:
        doc.substituted[value] = text
    return value


def load(text: str, file: str, env: Mapping[str, str] | None = None) -> Document:
    """Parse and interpolate a workflow file's text."""
    doc = parse(text, file)
    if doc.data is not None:
        interpolate(doc, env)
    return doc
