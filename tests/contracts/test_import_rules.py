"""The architecture's import rules ([tool.importlinter] in pyproject.toml, run by `./dev check`)
hold for the code, and fail for a change that breaks one: a service importing another, libs
importing a service, or a cycle inside a service."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=root,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def copy_of_the_code(at: Path) -> Path:
    for package in ("contracts", "libs", "services"):
        shutil.copytree(ROOT / package, at / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", at / "pyproject.toml")
    return at


def test_the_code_keeps_every_rule() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "rule"),
    [
        (
            "services/signup/routes.py",
            "from services.billing.settings import BillingSettings",
            "No service imports another",
        ),
        ("libs/http/app.py", "import services.targets", "Layers"),
        ("contracts/events.py", "import libs.timeutil", "Layers"),
        (
            "services/provisioner/admin_page.py",
            "from services.provisioner.routes import provisioner_routes",
            "No cycles",
        ),
    ],
)
def test_a_change_that_breaks_a_rule_fails(
    tmp_path: Path, module: str, line: str, rule: str
) -> None:
    root = copy_of_the_code(tmp_path)
    path = root / module
    path.write_text(path.read_text() + f"\n{line}  # noqa\n")
    result = lint_imports(root)
    assert result.returncode != 0, result.stdout
    broken = [row for row in result.stdout.splitlines() if row.endswith("BROKEN")]
    assert [row for row in broken if row.startswith(rule)], result.stdout
