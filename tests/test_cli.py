"""The `tusou keys` commands, through the real CLI entry point and the real key file."""

from __future__ import annotations

import json
import stat
from pathlib import Path

from click.testing import CliRunner

from tusou.cli import main
from tusou.store.keys import KeyStore


def run(*args: str) -> str:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_keys_create_list_revoke(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    created = json.loads(run("keys", "create", "--data", data, "--name", "shop"))
    assert set(created) == {"access_key", "secret_key"} and len(created["secret_key"]) >= 32

    listed = [json.loads(line) for line in run("keys", "list", "--data", data).splitlines()]
    assert listed == [{"access_key": created["access_key"], "name": "shop", "revoked": False}]
    assert created["secret_key"] not in run("keys", "list", "--data", data)
    assert created["secret_key"] in run("keys", "list", "--data", data, "--show-secrets")

    keys = KeyStore(tmp_path / "data" / "keys.db", cache_s=0)
    assert keys.secret_for(created["access_key"]) == created["secret_key"]
    run("keys", "revoke", "--data", data, created["access_key"])
    assert keys.secret_for(created["access_key"]) is None
    revoke_again = CliRunner().invoke(main, ["keys", "revoke", "--data", data, created["access_key"]])
    assert revoke_again.exit_code == 1


def test_key_files_are_private(tmp_path: Path) -> None:
    run("keys", "create", "--data", str(tmp_path))
    for path in tmp_path.glob("keys.db*"):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o077 == 0, f"{path.name} is readable by others: {oct(mode)}"


def test_env_settings_reach_the_cli(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TUSOU_DATA", str(tmp_path / "from-env"))
    run("keys", "create")
    assert (tmp_path / "from-env" / "keys.db").exists()
