"""The master key that seals personal data: generated once into the data folder's secrets
(owner only), kept across starts, and a different one given later is warned about, since the
personal data sealed under the first cannot be opened with it."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from services.cli.data_folder import secrets_env


def test_the_master_key_is_generated_once_and_kept(tmp_path: Path) -> None:
    first, given = secrets_env(tmp_path, {})
    kept = tmp_path / "secrets" / "data-keys-master-key"
    assert "DATA_KEYS_MASTER_KEY" not in given
    assert first["DATA_KEYS_MASTER_KEY"] == kept.read_text().strip()
    assert len(first["DATA_KEYS_MASTER_KEY"]) >= 32
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    again, _ = secrets_env(tmp_path, {})
    assert again["DATA_KEYS_MASTER_KEY"] == first["DATA_KEYS_MASTER_KEY"]


def test_a_different_master_key_given_later_is_warned_about(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secrets_env(tmp_path, {})
    capsys.readouterr()
    env, given = secrets_env(tmp_path, {"DATA_KEYS_MASTER_KEY": "k" * 40})
    assert env["DATA_KEYS_MASTER_KEY"] == "k" * 40 and "DATA_KEYS_MASTER_KEY" in given
    assert "cannot be opened" in " ".join(capsys.readouterr().err.split())
