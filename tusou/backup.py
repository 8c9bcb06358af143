"""Backups of a data folder that is in use, and their restore.

A backup is a folder holding a consistent copy of the records (``tusou.db``) and of the access keys
(``keys.db``), each made with SQLite's online backup API, and ``MANIFEST.json`` with each file's size and
SHA-256. The server keeps serving and writing meanwhile: a copy is one read transaction, so it holds every
write committed (acknowledged) before it started and nothing half-written. The search index and the model
cache are not copied: both are derived data, rebuilt by the server on its first start on the restored folder.

``MANIFEST.json`` is written last, through a temporary name: a backup cut off halfway has none and is
refused. Restore checks every size and checksum and runs SQLite's ``quick_check`` before it writes anything,
and writes only into a folder that holds no tusou data yet.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tusou import __version__
from tusou.files import sha256_file

MANIFEST = "MANIFEST.json"
FORMAT = "tusou-backup"
VERSION = 1
# What a backup holds, in order; tusou.db is optional (a Milvus deployment keeps only keys.db locally), and
# thumbs.db (the web page's thumbnails) is there unless thumbnails are turned off, keypoints.db (verification,
# docs/score.md) unless verification is.
DATABASES = ("tusou.db", "keys.db", "thumbs.db", "keypoints.db")


class BackupError(Exception):
    """A backup that cannot be taken or must not be restored; the message says why."""


@dataclass(frozen=True)
class BackupResult:
    files: dict[str, dict[str, Any]]
    groups: int
    images: int
    seconds: float


def _online_copy(source: Path, target: Path) -> None:
    """One consistent copy of a live SQLite database (WAL readers never block the server's writer)."""
    src = sqlite3.connect(source, timeout=30)
    dst = sqlite3.connect(target)
    try:
        # pages=-1: the whole database in one step, i.e. in one read transaction: one consistent snapshot.
        # (Step-wise copies restart whenever the server writes, and may never finish on a busy server.)
        src.backup(dst, pages=-1)
        # A self-contained file: no -wal/-shm beside it, so one checksum covers it.
        dst.execute("PRAGMA journal_mode=DELETE")
    finally:
        dst.close()
        src.close()
    os.chmod(target, 0o600)  # keys.db holds secrets; the records are tenant data


def _counts(db: Path) -> tuple[int, int]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        groups = conn.execute("SELECT COUNT(*) FROM groups").fetchone()[0]
        images = conn.execute("SELECT COUNT(*) FROM images").fetchone()[0]
    finally:
        conn.close()
    return groups, images


def backup(data: Path, dest: Path) -> BackupResult:
    """Copy the databases of ``data`` into the new folder ``dest`` (which must not exist or be empty)."""
    started = time.monotonic()
    if not (data / "keys.db").is_file():
        raise BackupError(f"{data}: not a tusou data folder (no keys.db)")
    if dest.exists() and any(dest.iterdir()):
        raise BackupError(f"{dest}: exists and is not empty")
    dest.mkdir(parents=True, exist_ok=True, mode=0o700)
    files: dict[str, dict[str, Any]] = {}
    for name in DATABASES:
        if not (data / name).is_file():
            continue
        target = dest / name
        _online_copy(data / name, target)
        files[name] = {"bytes": target.stat().st_size, "sha256": sha256_file(target)}
    groups, images = _counts(dest / "tusou.db") if "tusou.db" in files else (0, 0)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "tusou": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": str(data.resolve()),
        "groups": groups,
        "images": images,
        "files": files,
    }
    tmp = dest / (MANIFEST + ".tmp")
    with tmp.open("w", encoding="utf-8") as out:
        json.dump(manifest, out, indent=2, sort_keys=True)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, dest / MANIFEST)
    return BackupResult(files, groups, images, time.monotonic() - started)


def verify(src: Path) -> dict[str, Any]:
    """The manifest of the backup in ``src`` if every file is whole; :class:`BackupError` otherwise."""
    try:
        manifest = json.loads((src / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BackupError(f"{src}: no {MANIFEST}: not a complete backup") from None
    except (OSError, ValueError) as exc:
        raise BackupError(f"{src}: {MANIFEST} is damaged") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BackupError(f"{src}: not a tusou backup")
    if manifest.get("version") != VERSION:
        raise BackupError(f"{src}: backup format version {manifest.get('version')} is not supported")
    files = manifest.get("files")
    if not isinstance(files, dict) or "keys.db" not in files or not set(files) <= set(DATABASES):
        raise BackupError(f"{src}: {MANIFEST} is damaged")
    for name, expected in files.items():
        path = src / name
        if not path.is_file():
            raise BackupError(f"{src}: {name} is missing")
        if path.stat().st_size != expected.get("bytes"):
            raise BackupError(f"{src}: {name} has the wrong size: damaged or partial backup")
        if sha256_file(path) != expected.get("sha256"):
            raise BackupError(f"{src}: {name} fails its checksum: damaged backup")
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            result = conn.execute("PRAGMA quick_check").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            raise BackupError(f"{src}: {name} is not a readable database") from exc
        finally:
            conn.close()
        if result != "ok":
            raise BackupError(f"{src}: {name} fails SQLite's quick_check: {result}")
    return manifest


def restore(src: Path, data: Path) -> dict[str, Any]:
    """Verify the backup in ``src`` and put its files into ``data`` (new, or without tusou data in it)."""
    manifest = verify(src)
    clash = [name for name in (*DATABASES, "index") if (data / name).exists()]
    if clash:
        raise BackupError(f"{data}: already holds tusou data ({', '.join(clash)}); restore into a new folder")
    data.mkdir(parents=True, exist_ok=True, mode=0o700)
    for name in manifest["files"]:
        tmp = data / (name + ".restoring")
        shutil.copyfile(src / name, tmp)
        os.chmod(tmp, 0o600)
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, data / name)
    return manifest
