"""The `tusou keys` commands, through the real CLI entry point and the real key file."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import stat
import subprocess
import sys
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


def test_new_keys_never_start_with_a_dash(tmp_path: Path) -> None:
    # A key is a command-line argument: `keys revoke -lU8...` read as an option (1 key in 64 did).
    keys = KeyStore(tmp_path / "keys.db")
    made = [keys.create() for _ in range(400)]
    assert not [k for k in made if k.access_key.startswith("-") or k.secret_key.startswith("-")]
    assert all(len(k.access_key) == 40 for k in made)


def test_a_dashed_key_from_an_older_release_is_revoked_after_a_double_dash(tmp_path: Path) -> None:
    data = tmp_path / "data"
    keys = KeyStore(data / "keys.db", cache_s=0)
    keys.create()
    dashed = "-" + "a" * 39
    with sqlite3.connect(data / "keys.db") as conn:
        conn.execute("INSERT INTO keys VALUES (?, ?, ?, ?, 0)", (dashed, "s" * 40, "old", 0.0))
    assert keys.secret_for(dashed) == "s" * 40
    run("keys", "revoke", "--data", str(data), "--", dashed)
    assert keys.secret_for(dashed) is None


def test_key_files_are_private(tmp_path: Path) -> None:
    run("keys", "create", "--data", str(tmp_path))
    for path in tmp_path.glob("keys.db*"):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o077 == 0, f"{path.name} is readable by others: {oct(mode)}"


def test_env_settings_reach_the_cli(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TUSOU_DATA", str(tmp_path / "from-env"))
    run("keys", "create")
    assert (tmp_path / "from-env" / "keys.db").exists()


def test_reading_keys_outside_a_data_folder_creates_nothing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TUSOU_DATA", raising=False)
    for args in (["keys", "list"], ["keys", "revoke", "AK"], ["keys", "list", "--data", "elsewhere"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1, result.output
        assert "no tusou data folder at" in result.output and "--data" in result.output
    assert list(tmp_path.iterdir()) == []  # neither ./tusou-data nor ./elsewhere


def test_serve_on_a_busy_port_fails_before_printing_a_key(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "tusou", "serve", "--data", str(tmp_path / "data"), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert proc.stdout == ""  # no access key was created or printed
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr and "already running" in proc.stderr
    assert "serving" not in proc.stderr
    assert not (tmp_path / "data").exists()


CLIENT_COMMANDS = ["import", "copy", "groups", "info", "search", "duplicates"]


def test_help_reads_like_a_manual() -> None:
    """`tusou --help` says where the server, the key and the data folder come from and names every command
    with a whole summary line; each client command's help says where the key comes from."""
    top = run("--help")
    for name in ("TUSOU_SERVER", "TUSOU_ACCESS_KEY", "TUSOU_SECRET_KEY", "TUSOU_DATA", "tusou serve"):
        assert name in top, name
    listed = top.split("Commands:")[1].splitlines()
    assert {line.split()[0] for line in listed if line.strip()} == set(main.commands)
    assert [line for line in listed if line.rstrip().endswith("...")] == []  # no summary cut short
    for command in CLIENT_COMMANDS:
        assert "TUSOU_ACCESS_KEY" in run(command, "--help"), command
    keys_help = run("keys", "--help").split("Commands:")[1]
    assert "..." not in keys_help
    # Every model the factory accepts is named, as the README's settings table does.
    serve_help = " ".join(run("serve", "--help").split())
    for model in ("lite0", "lite1", "lite2", "onnx", "clip"):
        assert model in serve_help, model


def serve_fails(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return subprocess.run(
        [sys.executable, "-m", "tusou", "serve", "--data", str(tmp_path / "data"), "--port", str(port)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, **env},
    )


def test_bad_settings_stop_serve_with_one_line_and_no_key(tmp_path: Path) -> None:
    """A setting that cannot work is named in one line, before any key is printed or "serving" said."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        nobody = f"http://127.0.0.1:{closed.getsockname()[1]}"  # nothing listens there once closed
    cases = [
        ({"TUSOU_MODEL": "bogus"}, "unknown model 'bogus'"),
        ({"TUSOU_MODEL": "onnx", "TUSOU_ONNX_PATH": str(tmp_path / "none.onnx")}, "none.onnx is not a file"),
        ({"TUSOU_MODEL_INPUT_SIZE": "100"}, "invalid setting TUSOU_MODEL_INPUT_SIZE='100'"),
        ({"TUSOU_FETCH_ALLOW": "images.intranet"}, "invalid setting TUSOU_FETCH_ALLOW: not a JSON list"),
        ({"TUSOU_RATE_LIMIT_PER_S": "fast"}, "invalid setting TUSOU_RATE_LIMIT_PER_S='fast'"),
        ({"TUSOU_STORE": "milvus", "TUSOU_MILVUS_URI": nobody}, "Milvus: "),
    ]
    for env, said in cases:
        proc = serve_fails(tmp_path, **env)
        assert proc.returncode == 1, (env, proc.stdout, proc.stderr)
        assert proc.stdout == "", env  # no access key was printed
        errors = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
        assert len(errors) == 1 and said in errors[0], (env, proc.stderr)
        assert "Traceback" not in proc.stderr and "serving" not in proc.stderr, (env, proc.stderr)
    # The next start with good settings prints the first key, as the README says.
    keys = KeyStore(tmp_path / "data" / "keys.db") if (tmp_path / "data" / "keys.db").exists() else None
    assert keys is None or keys.active_count() == 0


def test_a_data_folder_that_cannot_be_used_stops_serve_with_one_line(tmp_path: Path) -> None:
    """A data path under a file (or on a read-only disk) is named in one line, not a traceback."""
    (tmp_path / "file").write_text("x")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tusou",
            "serve",
            "--data",
            str(tmp_path / "file" / "data"),
            "--port",
            str(port),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1 and proc.stdout == "", proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert errors == [
        f"Error: {tmp_path / 'file' / 'data'}: cannot use it as the data folder (Not a directory)"
    ]


def test_duplicates_page_out_of_range_names_the_option() -> None:
    """--page 0 was sent as it was and came back as the server's "invalid limit", an option the command
    does not have."""
    for page in ("0", "1001"):
        result = CliRunner().invoke(
            main, ["duplicates", "g", "--page", page, "--server", "http://127.0.0.1:9"]
        )
        assert result.exit_code == 2 and "'--page'" in result.output and "1<=x<=1000" in result.output


def test_backup_names_a_bad_setting(tmp_path: Path) -> None:
    """backup reads TUSOU_DATA through the same settings as the other commands: a malformed variable is one
    line, not a traceback."""
    result = CliRunner().invoke(main, ["backup", str(tmp_path / "b")], env={"TUSOU_PORT": "abc"})
    assert result.exit_code == 1 and "invalid setting TUSOU_PORT='abc'" in result.output, result.output
    assert not (tmp_path / "b").exists()
