"""The part of Go's ``text/template`` language that Ollama chat templates use, rendered in Python.

A Modelfile's ``TEMPLATE`` is a Go template; Ollama renders it with the conversation (``.Messages``, each with
``.Role`` and ``.Content``, and ``.System``). Ollama is not available where finsight exports, so to know that the
template it writes renders a conversation exactly as the Hugging Face chat template the model was trained with,
finsight renders it here and compares. Supported: text; actions with ``{{-``/``-}}`` whitespace trimming;
``.Field``, ``$.Field``, ``$var``, ``$var.Field``; ``if``/``else if``/``else``/``end``;
``range $i, $m := PIPE`` and ``range PIPE``; the functions ``eq``, ``ne``, ``gt``, ``lt``, ``and``, ``or``,
``not`` and ``len``; string and integer literals; parentheses. Anything else raises ``GoTemplateError``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from finsight.errors import FinSightError


class GoTemplateError(FinSightError, ValueError):
    """A template this renderer does not understand (outside the subset above, or malformed).

    Fix: keep the template to the subset the message names (`if`, `range`, `with`, variables, comparisons) or
    correct the template text it quotes.
    """


_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.DOTALL)
_TOKEN = re.compile(r'\s*(?:(\()|(\))|("(?:[^"\\]|\\.)*")|(-?\d+)|(\$?[A-Za-z_][\w]*(?:\.[A-Za-z_]\w*)*|\$(?:\.[A-Za-z_]\w*)*|\.(?:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)?))')


@dataclass
class _Node:
    kind: str  # text, value, if, range
    text: str = ""
    branches: list[tuple[str | None, list[_Node]]] = field(default_factory=list)  # (condition, body); None: else
    variables: tuple[str, ...] = ()


def _parse(template: str) -> list[_Node]:
    """The template as a tree, whitespace trimmed where the actions ask for it."""
    pieces: list[tuple[str, str]] = []
    position = 0
    for match in _ACTION.finditer(template):
        text = template[position:match.start()]
        if match.group(1):
            text = text.rstrip()
        if pieces and pieces[-1][0] == "trim-next":
            pieces.pop()
            text = text.lstrip()
        pieces.append(("text", text))
        pieces.append(("action", match.group(2).strip()))
        if match.group(3):
            pieces.append(("trim-next", ""))
        position = match.end()
    tail = template[position:]
    if pieces and pieces[-1][0] == "trim-next":
        pieces.pop()
        tail = tail.lstrip()
    pieces.append(("text", tail))
    return _block(pieces, 0, top=True)[0]


def _block(pieces: list[tuple[str, str]], index: int, top: bool = False) -> tuple[list[_Node], int]:
    nodes: list[_Node] = []
    while index < len(pieces):
        kind, content = pieces[index]
        if kind == "text":
            if content:
                nodes.append(_Node("text", content))
            index += 1
            continue
        keyword = content.split(None, 1)[0] if content else ""
        if keyword in ("end", "else"):
            if top:
                raise GoTemplateError(f"unexpected {{{{ {content} }}}}")
            return nodes, index
        if keyword == "if":
            node = _Node("if")
            condition: str | None = content[2:].strip()
            while True:
                body, index = _block(pieces, index + 1)
                node.branches.append((condition, body))
                ending = pieces[index][1] if index < len(pieces) else ""
                if ending == "end":
                    break
                if ending == "else":
                    condition = None
                elif ending.startswith("else if "):
                    condition = ending[len("else if "):].strip()
                else:
                    raise GoTemplateError("an {{ if }} without {{ end }}")
            nodes.append(node)
            index += 1
            continue
        if keyword == "range":
            spec = content[len("range"):].strip()
            variables: tuple[str, ...] = ()
            if ":=" in spec:
                names, spec = spec.split(":=", 1)
                variables = tuple(name.strip() for name in names.split(","))
            body, index = _block(pieces, index + 1)
            if index >= len(pieces) or pieces[index][1] != "end":
                raise GoTemplateError("a {{ range }} without {{ end }}")
            nodes.append(_Node("range", spec.strip(), [(None, body)], variables))
            index += 1
            continue
        nodes.append(_Node("value", content))
        index += 1
    if not top:
        raise GoTemplateError("a block without {{ end }}")
    return nodes, index


def _field(value: Any, path: str) -> Any:
    for name in filter(None, path.split(".")):
        value = value.get(name) if isinstance(value, Mapping) else getattr(value, name, None)
    return value


# Go's truth is Python's: false, 0, "", nil and empty collections are false.
_FUNCTIONS = {
    "eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "gt": lambda a, b: a > b, "lt": lambda a, b: a < b,
    "and": lambda *values: next((v for v in values if not v), values[-1]),
    "or": lambda *values: next((v for v in values if v), values[-1]),
    "not": lambda value: not value, "len": len,
}


class _Scope:
    def __init__(self, root: Mapping[str, Any]) -> None:
        self.root = root
        self.dot: Any = root
        self.variables: dict[str, Any] = {}

    def evaluate(self, expression: str) -> Any:
        tokens = [next(group for group in match.groups() if group is not None)
                  for match in _TOKEN.finditer(expression)]
        if "".join(tokens).replace(" ", "") != re.sub(r"\s+", "", expression):
            raise GoTemplateError(f"cannot read {{{{ {expression} }}}}")
        value, rest = self._command(tokens)
        if rest:
            raise GoTemplateError(f"cannot read {{{{ {expression} }}}}")
        return value

    def _command(self, tokens: list[str]) -> tuple[Any, list[str]]:
        """A function call with its arguments, or one operand."""
        if tokens and tokens[0] in _FUNCTIONS:
            name, tokens = tokens[0], tokens[1:]
            arguments = []
            while tokens and tokens[0] != ")":
                value, tokens = self._operand(tokens)
                arguments.append(value)
            return _FUNCTIONS[name](*arguments), tokens
        return self._operand(tokens)

    def _operand(self, tokens: list[str]) -> tuple[Any, list[str]]:
        token, tokens = tokens[0], tokens[1:]
        if token == "(":
            value, tokens = self._command(tokens)
            if not tokens or tokens[0] != ")":
                raise GoTemplateError("unbalanced parentheses")
            return value, tokens[1:]
        if token.startswith('"'):
            return bytes(token[1:-1], "utf-8").decode("unicode_escape"), tokens
        if re.fullmatch(r"-?\d+", token):
            return int(token), tokens
        if token.startswith("$"):
            name, _, path = token.partition(".")
            if name == "$":
                return _field(self.root, path), tokens
            if name not in self.variables:
                raise GoTemplateError(f"undefined variable {name}")
            return _field(self.variables[name], path), tokens
        if token.startswith("."):
            return _field(self.dot, token), tokens
        raise GoTemplateError(f"unknown function or value {token!r}")


def _render(nodes: Sequence[_Node], scope: _Scope, out: list[str]) -> None:
    for node in nodes:
        if node.kind == "text":
            out.append(node.text)
        elif node.kind == "value":
            value = scope.evaluate(node.text)
            out.append("" if value is None else str(value))
        elif node.kind == "if":
            for condition, body in node.branches:
                if condition is None or scope.evaluate(condition):
                    _render(body, scope, out)
                    break
        else:  # range
            items = scope.evaluate(node.text) or []
            saved_dot, saved = scope.dot, dict(scope.variables)
            for index, item in enumerate(items):
                scope.dot = item
                if len(node.variables) == 2:
                    scope.variables[node.variables[0]], scope.variables[node.variables[1]] = index, item
                elif len(node.variables) == 1:
                    scope.variables[node.variables[0]] = item
                _render(node.branches[0][1], scope, out)
            scope.dot, scope.variables = saved_dot, saved


def render(template: str, data: Mapping[str, Any]) -> str:
    """``template`` rendered with ``data`` (for Ollama: ``Messages``, ``System``), as Go would render it."""
    out: list[str] = []
    _render(_parse(template), _Scope(data), out)
    return "".join(out)
