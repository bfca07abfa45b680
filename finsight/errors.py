"""The one base class of every error a user can fix.

The console entry point catches :class:`FinSightError` once and prints its message as one ``error:`` line
with exit status 1, so a new user-fixable error only has to subclass it; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations


class FinSightError(Exception):
    """An error the user can fix from its one-line message: it names the file, row, key or option at fault."""


def error_classes() -> list[type[FinSightError]]:
    """Every error class finsight defines, each module imported once to find them, sorted by name."""
    import importlib
    import pkgutil

    import finsight

    for module in pkgutil.walk_packages(finsight.__path__, "finsight."):
        importlib.import_module(module.name)
    found: list[type[FinSightError]] = []
    pending = [FinSightError]
    while pending:
        for subclass in pending.pop().__subclasses__():
            if subclass.__module__.startswith("finsight.") and subclass not in found:
                found.append(subclass)
                pending.append(subclass)
    return sorted(found, key=lambda cls: cls.__name__)


def raised_messages() -> dict[str, list[str]]:
    """The message of every ``SomeError(...)`` built in finsight's source, by error class name, as a template:
    an f-string's fields shown as ``{name}``, a message built elsewhere as ``(built by ...)``."""
    import ast
    from pathlib import Path

    def template(node: ast.expr) -> str:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        if isinstance(node, ast.JoinedStr):
            return "".join(template(part) if not isinstance(part, ast.FormattedValue)
                           else "{" + ast.unparse(part.value) + "}" for part in node.values)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            return template(node.left) + template(node.right)
        return f"(built by `{ast.unparse(node)[:60]}`)"

    messages: dict[str, list[str]] = {}
    root = Path(__file__).resolve().parent
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            # Every construction of an error, raised where it is built or returned to be raised elsewhere.
            if isinstance(node, ast.Call) and node.args:
                name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
                if not name.endswith("Error"):
                    continue
                text = template(node.args[0])
                if text not in messages.setdefault(name, []):
                    messages[name].append(text)
    return messages


def error_catalogue_markdown() -> str:
    """The troubleshooting page's list of errors: per class, its cause and fix (the class docstring) and the
    messages its raise sites print after ``error:``. Generated, so a new error cannot go undocumented."""
    import inspect

    messages = raised_messages()
    sections = []
    for cls in error_classes():
        doc = inspect.cleandoc(cls.__doc__ or "")
        cause, _, fix = doc.partition("\nFix: ")
        lines = [f"### {cls.__name__}", "", f"*{cls.__module__}*", "", cause.replace("\n", " ").strip(), ""]
        lines += [f"**Fix:** {' '.join(fix.split())}", ""] if fix else []
        shown = messages.get(cls.__name__, [])
        if shown:
            lines += ["What it prints:", ""]
            lines += [f"- `error: {' '.join(text.split()).replace('`', chr(39))}`" for text in shown]
            lines.append("")
        sections.append("\n".join(lines))
    return "\n".join(sections).rstrip()
