"""The house rules a newcomer relies on: short modules and short functions, or a stated reason.

- A module of ``contracts``, ``libs`` or ``services`` over 400 lines says why in its docstring,
  in a paragraph starting "Longer than 400 lines because".
- No function in ``services`` is over 60 lines (``def`` to its last line, nested ones too).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODULE_LINES = 400
FUNCTION_LINES = 60
REASON = "Longer than 400 lines because"


def long_modules(root: Path, folders: tuple[str, ...]) -> list[str]:
    """Modules over the limit whose docstring gives no reason."""
    found = []
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            text = path.read_text()
            if text.count("\n") <= MODULE_LINES:
                continue
            docstring = ast.get_docstring(ast.parse(text)) or ""
            if REASON not in docstring:
                found.append(f"{path.relative_to(root)}: {text.count(chr(10))} lines")
    return found


def long_functions(root: Path, folder: str) -> list[str]:
    """Functions over the limit, with their length."""
    found = []
    for path in sorted((root / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > FUNCTION_LINES:
                    found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} {length}")
    return found


def test_long_modules_say_why() -> None:
    assert long_modules(ROOT, ("contracts", "libs", "services")) == []


def test_no_long_functions_in_services() -> None:
    assert long_functions(ROOT, "services") == []


def test_the_checks_find_what_they_look_for(tmp_path: Path) -> None:
    package = tmp_path / "services"
    package.mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(FUNCTION_LINES))
    (package / "long.py").write_text(f"def too_long():\n{body}\n\n" + "\n" * MODULE_LINES)
    (package / "reasoned.py").write_text(f'"""Big.\n\n{REASON} it is a table."""\n' + "\n" * 500)
    (package / "short.py").write_text("def fine():\n    return 1\n")
    assert long_functions(tmp_path, "services") == [
        f"services/long.py:1 too_long {FUNCTION_LINES + 1}"
    ]
    assert long_modules(tmp_path, ("services",)) == [
        f"services/long.py: {FUNCTION_LINES + 2 + MODULE_LINES} lines"
    ]
