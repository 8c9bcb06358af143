"""The ``tusou`` command: run the server and manage access keys.

Every option of ``tusou serve`` can also be set as an environment variable (``TUSOU_DATA``, ``TUSOU_PORT``,
...); see ``tusou/config.py`` for the full list.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import sqlite3
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from tusou.cli_data import COMMANDS as DATA_COMMANDS
from tusou.cli_duplicates import duplicates
from tusou.config import Settings
from tusou.errors import StoreError
from tusou.files import private_dir
from tusou.store.keys import KeyStore

data_option = click.option(
    "--data",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Data folder (env TUSOU_DATA; default ./tusou-data).",
)


def _settings(**overrides: Any) -> Settings:
    """The settings from the environment and the command line; a bad value is one line naming it."""
    import re

    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**given)
    except SettingsError as exc:  # a list or tuple setting that is not JSON
        field = re.search(r'field "(\w+)"', str(exc))
        name = f"TUSOU_{field.group(1).upper()}" if field else "a TUSOU_ variable"
        raise click.ClickException(
            f"invalid setting {name}: not a JSON list (e.g. TUSOU_FETCH_ALLOW='[\"images.intranet\"]')"
        ) from None
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            name = str(error["loc"][0]) if error["loc"] else ""
            where = f"--{name.replace('_', '-')}" if name in given else f"TUSOU_{name.upper()}"
            problems.append(f"{where}={error.get('input')!r}: {error['msg']}")
        raise click.ClickException("invalid setting " + "; ".join(problems)) from None


def _keys(settings: Settings) -> KeyStore:
    try:
        private_dir(settings.data)
        return KeyStore(settings.data / "keys.db")
    except (OSError, sqlite3.Error) as exc:  # not a folder, read-only, no permission: one line
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise click.ClickException(f"{settings.data}: cannot use it as the data folder ({reason})") from None


def _existing_keys(settings: Settings) -> KeyStore:
    """The key store of a data folder that exists: reading keys never creates a folder as a side effect."""
    path = settings.data / "keys.db"
    if not path.is_file():
        raise click.ClickException(
            f"no tusou data folder at {settings.data.resolve()} (it has no keys.db); "
            "pass --data DIR or set TUSOU_DATA to the folder `tusou serve` uses"
        )
    return KeyStore(path)


@contextmanager
def _refusals() -> Iterator[None]:
    """A data folder or collection this release cannot use as it is (another model's vectors): one line
    naming the way out (`tusou upgrade`, `tusou reembed`), not a traceback. Likewise a model the settings
    name that cannot be loaded (an unknown name, TUSOU_MODEL=onnx without TUSOU_ONNX_PATH, ...): the
    model and store factories raise ValueError for those. And a Milvus store that cannot be used: pymilvus
    not installed, or the server not answering."""
    from tusou.store.base import ModelMismatch

    try:
        yield
    except (ModelMismatch, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    except ModuleNotFoundError as exc:
        if exc.name != "pymilvus":
            raise
        raise click.ClickException(
            "TUSOU_STORE=milvus needs pymilvus: pip install '/path/to/tusou[milvus]' (docs/scale.md)"
        ) from None
    except Exception as exc:
        if not type(exc).__module__.startswith("pymilvus"):
            raise
        raise click.ClickException(f"Milvus: {getattr(exc, 'message', None) or exc}") from None


def _listen_socket(host: str, port: int) -> socket.socket:
    """The server's listening socket, bound before anything is printed or created: a busy port fails first."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        hint = " (is tusou already running? choose another --port)" if exc.errno == errno.EADDRINUSE else ""
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror}{hint}") from None
    sock.set_inheritable(True)
    return sock


@click.group()
@click.version_option(package_name="tusou")
def main() -> None:
    """tusou (图搜): self-hosted search by image, wire-compatible with Qiniu's image search API.

    Start the server with `tusou serve --data DIR`; its first start prints an access key and its secret.

    \b
    On a data folder (--data or TUSOU_DATA, default ./tusou-data):
      serve, keys, backup, restore, upgrade, reembed, retag, thumbs, migrate
    Clients of a running server (--server or TUSOU_SERVER, default http://127.0.0.1:8000;
    the key from TUSOU_ACCESS_KEY and TUSOU_SECRET_KEY):
      import, copy, groups, info, search, duplicates

    Every setting of the server is an environment variable TUSOU_<NAME> (README.md, tusou/config.py).
    `tusou COMMAND --help` tells what a command does.
    """


@main.command(short_help="Start the HTTP server.")
@data_option
@click.option("--host", default=None, help="Address to listen on (env TUSOU_HOST; default 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port (env TUSOU_PORT; default 8000).")
@click.option(
    "--model",
    default=None,
    help="lite0, lite1, lite2, onnx or clip (env TUSOU_MODEL; default lite0).",
)
def serve(data: Path | None, host: str | None, port: int | None, model: str | None) -> None:
    """Start the HTTP server (on the embedded store, or on Milvus with TUSOU_STORE=milvus: docs/scale.md).

    On a first start with no access key, one is created and printed so that the API can be called at once.
    """
    import uvicorn

    from tusou.allocator import tune_for_serving
    from tusou.api.app import create_app
    from tusou.api.guard import uvicorn_options
    from tusou.service import build_service

    tune_for_serving()
    os.umask(0o077)  # whatever the server creates in its data folder (and temp files) is private
    settings = _settings(data=data, host=host, port=port, model=model)
    sock = _listen_socket(settings.host, settings.port)
    keys = _keys(settings)
    # uvicorn configures only its own loggers; without this, tusou's access log lines go nowhere.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Built before the server starts, so that a folder this release cannot serve as it is (another model's
    # vectors) is refused with one line naming the way out (`tusou upgrade`, `tusou reembed`), and before
    # the first key is printed: a start that fails (a bad model setting) prints no key and no "serving".
    in_use = f"{settings.data} is in use by another tusou process (is a server already running on it?)"
    if settings.store == "sqlite" and settings.db_path.exists():
        from tusou.store.sqlite import folder_in_use

        if folder_in_use(settings.db_path):  # before loading a model and every index only to be refused
            raise click.ClickException(in_use)
    with _refusals():
        service = build_service(settings)
    if getattr(service.store, "shared", False):  # taken meanwhile (tusou/store/sqlite.py)
        service.close()
        raise click.ClickException(in_use)
    if keys.active_count() == 0:
        key = keys.create("default")
        click.echo("Created a first access key (keep the secret; `tusou keys list --show-secrets` shows it):")
        click.echo(json.dumps({"access_key": key.access_key, "secret_key": key.secret_key}))
    click.echo(f"tusou serving {settings.data.resolve()} on http://{settings.host}:{settings.port}", err=True)
    # The app's lifespan closes the service when the server stops (index snapshots written): uvicorn
    # re-raises SIGTERM after its shutdown, so nothing after ``run`` would run.
    app = create_app(settings, service=service, keys=keys, close_service=True)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level="info", access_log=False, **uvicorn_options()
    )
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except BaseException:
        service.close()  # the server failed before or after its lifespan; closing twice is harmless
        raise


@main.group(short_help="Create, list and revoke access keys (one per tenant).")
def keys() -> None:
    """Manage access keys: each key is a tenant that sees only its own groups."""


@keys.command("create", short_help="Create a key and print it with its secret as JSON.")
@data_option
@click.option("--name", default="", help="A note to tell keys apart.")
def keys_create(data: Path | None, name: str) -> None:
    """Create a key and print it as JSON: {"access_key": ..., "secret_key": ...}."""
    key = _keys(_settings(data=data)).create(name)
    click.echo(json.dumps({"access_key": key.access_key, "secret_key": key.secret_key}))


@keys.command("list")
@data_option
@click.option("--show-secrets", is_flag=True, help="Print secret keys too.")
def keys_list(data: Path | None, show_secrets: bool) -> None:
    """List keys as JSON lines."""
    for key in _existing_keys(_settings(data=data)).list():
        entry = {"access_key": key.access_key, "name": key.name, "revoked": key.revoked}
        if show_secrets:
            entry["secret_key"] = key.secret_key
        click.echo(json.dumps(entry))


@keys.command("revoke", short_help="Revoke ACCESS_KEY: its requests are refused from then on.")
@data_option
@click.argument("access_key")
def keys_revoke(data: Path | None, access_key: str) -> None:
    """Revoke ACCESS_KEY: its requests are refused from then on (its groups stay on disk)."""
    if not _existing_keys(_settings(data=data)).revoke(access_key):
        click.echo(f"no active key {access_key}", err=True)
        sys.exit(1)
    click.echo(f"revoked {access_key}")


@main.command(short_help="Copy groups from the embedded store in --data to Milvus.")
@data_option
@click.option("--milvus-uri", required=True, help="Destination Milvus server (http://host:19530).")
@click.option("--milvus-collection", default=None, help="Destination collection (default tusou_images).")
@click.option("--milvus-token", default=None, help="Milvus token, if the server needs one.")
@click.option("--access-key", "access_keys", multiple=True, help="Only this key's groups (repeatable).")
@click.option("--group", "groups", multiple=True, help="Only this group (repeatable; with one --access-key).")
def migrate(
    data: Path | None,
    milvus_uri: str,
    milvus_collection: str | None,
    milvus_token: str | None,
    access_keys: tuple[str, ...],
    groups: tuple[str, ...],
) -> None:
    """Copy groups from the embedded store in --data to Milvus, with their vectors (no re-embedding).

    Safe to repeat after an interruption: images already in Milvus are skipped. Stop the server on --data
    first, or writes made during the copy may be missed.
    """
    from tusou.embed import create_embedder
    from tusou.store import open_store
    from tusou.store.migrate import migrate as copy_group

    source_settings = _settings(data=data)
    target_settings = _settings(
        data=data,
        store="milvus",
        milvus_uri=milvus_uri,
        milvus_collection=milvus_collection,
        milvus_token=milvus_token,
    )
    if groups and len(access_keys) != 1:
        raise click.UsageError("--group needs exactly one --access-key")
    with _refusals():
        embedder = create_embedder(source_settings)
        convert_from = getattr(embedder, "convert_from", None)
        src = open_store(
            source_settings, model_id=embedder.model_id, dim=embedder.dim, convert_from=convert_from
        )
    with _refusals():
        try:
            dst = open_store(target_settings, model_id=embedder.model_id, dim=embedder.dim)
        except BaseException:
            src.close()
            raise
    try:
        tenants = list(access_keys) or [key.access_key for key in _keys(source_settings).list()]
        for tenant in tenants:
            for group in groups or src.list_groups(tenant):
                label = f"{tenant[:8]}…/{group}"

                def progress(done: int, total: int, label: str = label) -> None:
                    click.echo(f"{label}: {done}/{total}", err=True)

                result = copy_group(src, dst, tenant, group, progress)
                click.echo(
                    json.dumps(
                        {
                            "access_key": tenant,
                            "group": group,
                            "copied": result.copied,
                            "skipped": result.skipped,
                        }
                    )
                )
    finally:
        src.close()
        dst.close()


@main.command(short_help="Convert the stored vectors of --data to this release's model.")
@data_option
@click.option(
    "--backup",
    "backup_dest",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="First take a backup (as `tusou backup`) into this new folder.",
)
@click.option("--batch", type=click.IntRange(1, 100_000), default=1000, help="Vectors per transaction.")
def upgrade(data: Path | None, backup_dest: Path | None, batch: int) -> None:
    """Convert the stored vectors of --data to this release's model, without re-embedding.

    Needed once, when `tusou serve` refuses a folder written by an earlier release and names this command.
    Stop the server first. The vectors are rewritten in place, in transactions: an interrupted run (even
    kill -9) is finished by running it again, or by the next `tusou serve`. Afterwards the earlier release
    no longer opens the folder and the old vectors are gone: take a backup first (--backup DIR does it
    here). Prints progress on stderr and one JSON line: from, to, vectors, seconds.
    """
    import sqlite3
    import time

    from tusou import upgrade as upgrades
    from tusou.embed import create_embedder
    from tusou.store.base import ModelMismatch
    from tusou.store.sqlite import SQLiteStore

    settings = _settings(data=data)
    _existing_keys(settings).close()  # the same clear error as the key commands outside a data folder
    if settings.store != "sqlite":
        raise click.ClickException(
            "tusou upgrade converts the embedded store; a Milvus collection has a fixed width: "
            "see docs/scale.md for moving to a new collection"
        )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with _refusals():
        embedder = create_embedder(settings)
    convert_from = getattr(embedder, "convert_from", None)
    conn = sqlite3.connect(f"file:{settings.db_path}?mode=ro", uri=True)
    try:
        source = upgrades.pending(conn, embedder.model_id, convert_from)
    except ModelMismatch as exc:
        raise click.ClickException(f"{settings.db_path}: {exc}") from None
    except sqlite3.Error as exc:
        raise click.ClickException(f"{settings.db_path}: {exc}") from None
    finally:
        conn.close()
    if source is None:
        click.echo(json.dumps({"model": embedder.model_id, "vectors": 0, "note": "nothing to upgrade"}))
        return
    try:
        upgrades.ensure_not_in_use(settings.db_path)
    except upgrades.FolderInUse as exc:
        raise click.ClickException(str(exc)) from None
    if backup_dest is not None:
        from tusou.backup import BackupError
        from tusou.backup import backup as take_backup

        try:
            taken = take_backup(settings.data, backup_dest)
        except BackupError as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(f"backup of {taken.images} images in {backup_dest}", err=True)
    shown = [0.0]

    def progress(done: int, total: int) -> None:
        if done == total or time.monotonic() - shown[0] >= 1:
            shown[0] = time.monotonic()
            click.echo(f"upgrade: {done}/{total} vectors", err=True)

    store = SQLiteStore(
        settings.db_path,
        model_id=embedder.model_id,
        dim=embedder.dim,
        group_max_images=settings.group_max_images,
        convert_from=convert_from,
        upgrade=True,
        upgrade_progress=progress,
        upgrade_batch=batch,
    )
    store.close()  # writes the new index snapshots: the next start loads them
    done = store.upgraded
    click.echo(
        json.dumps(
            {
                "from": source,
                "to": embedder.model_id,
                "vectors": done.rows if done else 0,
                "seconds": round(done.seconds, 2) if done else 0,
            }
        )
    )


@main.command(short_help="Re-embed the images of --data with another model.")
@data_option
@click.option("--group", "groups", multiple=True, help="Only this group (repeatable); default every group.")
@click.option("--access-key", "access_keys", multiple=True, help="Only this key's groups (repeatable).")
@click.option(
    "--failures",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("tusou-reembed-failures.jsonl"),
    show_default=True,
    help="Where the images that could not be re-embedded are listed (JSON lines, an import manifest).",
)
@click.option(
    "--drop-failed",
    is_flag=True,
    help="Switch the folder even if some images could not be re-embedded: they are deleted from it "
    "(and listed in --failures, to add again with `tusou import`).",
)
@click.option("--workers", type=click.IntRange(1, 64), default=4, show_default=True, help="Parallel fetches.")
@click.option(
    "--batch", type=click.IntRange(1, 10_000), default=32, show_default=True, help="Images per commit."
)
def reembed(
    data: Path | None,
    groups: tuple[str, ...],
    access_keys: tuple[str, ...],
    failures: Path,
    drop_failed: bool,
    workers: int,
    batch: int,
) -> None:
    """Re-embed the images of --data from their stored URIs with this release's model.

    For a folder indexed with another model whose vectors cannot be converted (`tusou serve` says so and
    names this command; `tusou upgrade` handles the ones that can). Stop the server first. New vectors are
    kept aside until every image of the folder has one, then the folder switches to them in one step, so
    no group ever mixes two vector formats; until then the folder stays as it was. Interrupted (even by
    kill -9), it is started again and skips the images already done. Images whose URI cannot be fetched,
    or that have none (added from a data: URI), are listed in --failures with the reason and the folder is
    not switched while any remains: fix and run again, or pass --drop-failed. --group/--access-key limit
    a run to some groups (the switch waits for the rest). Prints progress on stderr and one JSON line.
    """
    import time

    from tusou import reembed as reembeds
    from tusou.embed import create_embedder
    from tusou.fetch import Fetcher, load_image
    from tusou.images import PixelBudget
    from tusou.store.base import ModelMismatch
    from tusou.thumbs import ThumbStore
    from tusou.upgrade import FolderInUse

    settings = _settings(data=data)
    keys = _existing_keys(settings)
    if settings.store != "sqlite":
        raise click.ClickException(
            "tusou reembed works on the embedded store; for Milvus, import the images into a new "
            "collection (docs/scale.md)"
        )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    selected: list[tuple[str, str]] | None = None
    if groups or access_keys:
        import sqlite3

        tenants = list(access_keys) or [key.access_key for key in keys.list()]
        conn = sqlite3.connect(f"file:{settings.db_path}?mode=ro", uri=True)
        try:
            stored = set(conn.execute("SELECT tenant, name FROM groups"))
        finally:
            conn.close()  # an open connection would mark the folder in use
        selected = [(t, g) for t, g in sorted(stored) if t in tenants and (not groups or g in groups)]
        if not selected:
            raise click.ClickException(f"no such group in {settings.data}")
    keys.close()
    with _refusals():
        embedder = create_embedder(settings)
    fetcher = Fetcher(settings)
    budget = PixelBudget(settings.decode_max_pixels, settings.decode_wait_s)

    def load(uri: str) -> Any:
        return load_image(uri, fetcher, embedder.min_short, budget)

    def drop(failed: list[reembeds.Failure]) -> None:
        for name in ("thumbs.db", "keypoints.db"):
            if (settings.data / name).is_file():
                pictures = ThumbStore(settings.data / name)
                for f in failed:
                    pictures.delete(f.access_key, f.group, [f.id])
                pictures.close()

    shown = [0.0]

    def progress(done: int, total: int, failed: int) -> None:
        if done == total or time.monotonic() - shown[0] >= 1:
            shown[0] = time.monotonic()
            click.echo(f"reembed: {done}/{total} images ({failed} failed)", err=True)

    try:
        result = reembeds.reembed(
            settings.db_path,
            settings.data / "index",
            embedder,
            load,
            groups=selected,
            progress=progress,
            drop_failed=drop_failed,
            drop=drop,
            workers=workers,
            batch=batch,
        )
    except (ModelMismatch, FolderInUse) as exc:
        raise click.ClickException(str(exc)) from None
    if result.failed:
        reembeds.write_failures(failures, result.failed, dropped=bool(result.dropped))
    click.echo(
        json.dumps(
            {
                "to": result.target,
                "embedded": result.embedded,
                "earlier": result.earlier,
                "failed": len(result.failed),
                "dropped": result.dropped,
                "remaining": result.remaining,
                "switched": result.switched,
                "current": result.current,
                **({"failures": str(failures)} if result.failed else {}),
            }
        )
    )
    if result.current:
        click.echo(f"nothing to re-embed: the folder already holds {result.target}'s vectors", err=True)
    if result.failed and not result.dropped:
        click.echo(
            f"{len(result.failed)} images could not be re-embedded (listed with the reason in {failures}); "
            "the folder keeps its old vectors: fix their URIs (or add them again) and run again, "
            "or pass --drop-failed to switch without them",
            err=True,
        )
        sys.exit(1)
    if not result.switched and result.remaining:
        click.echo(
            f"{result.remaining} images in other groups still need re-embedding; the folder switches once "
            "none remains",
            err=True,
        )


@main.command(short_help="Recompute the automatic tags of GROUP from stored URIs.")
@data_option
@click.argument("group")
@click.option("--access-key", "access_keys", multiple=True, help="Only this key's group (repeatable).")
def retag(data: Path | None, group: str, access_keys: tuple[str, ...]) -> None:
    """Recompute the automatic tags of GROUP's images from their stored URIs (docs/words.md).

    Each image is fetched and run through the model again; its vector stays as it is. Images added from
    data: URIs have no stored URI and keep the tags they have (none, if added before tags existed): add
    them again to tag them. Prints one JSON line per access key owning GROUP: tagged, no_uri, failed.
    Best run with the server on --data stopped, as this opens the same store; tags are read from it per
    request, so a server started afterwards answers them at once.
    """
    from tusou.service import build_service

    settings = _settings(data=data)
    if not (settings.data / "keys.db").is_file():
        _existing_keys(settings)  # the same clear error as the key commands
    with _refusals():
        service = build_service(settings)
    try:
        if not service.tagging:
            raise click.ClickException("tags need a built-in model (lite0, lite1, lite2) and TUSOU_TAGS on")
        tenants = list(access_keys) or [key.access_key for key in _keys(settings).list()]
        owners = [t for t in tenants if group in service.store.list_groups(t)]
        if not owners:
            raise click.ClickException(f"no group {group!r} in {settings.data}")
        for tenant in owners:

            def progress(done: int, total: int, tagged: int, tenant: str = tenant) -> None:
                click.echo(f"{tenant[:8]}…/{group}: {done}/{total} ({tagged} tagged)", err=True)

            counts = service.retag(tenant, group, progress)
            click.echo(json.dumps({"access_key": tenant, "group": group, **counts}))
    finally:
        service.close()


@main.command(short_help="Make the missing thumbnails of GROUP from stored URIs.")
@data_option
@click.argument("group")
@click.option("--access-key", "access_keys", multiple=True, help="Only this key's group (repeatable).")
def thumbs(data: Path | None, group: str, access_keys: tuple[str, ...]) -> None:
    """Make the missing thumbnails of GROUP's images (the web page's pictures) from their stored URIs.

    For images stored before thumbnails existed or while TUSOU_THUMBNAILS was false. Images added from data:
    URIs have no stored copy and stay without one until added again. Prints one JSON line per access key
    owning GROUP: made, had, no_uri, failed. Safe to run while the server runs, and to run again.
    """
    from tusou.service import build_service

    settings = _settings(data=data)
    _existing_keys(settings).close()  # the same clear error as the key commands outside a data folder
    if not settings.thumbnails:
        raise click.ClickException("thumbnails are turned off (TUSOU_THUMBNAILS=false)")
    with _refusals():
        service = build_service(settings)
    try:
        tenants = list(access_keys) or [key.access_key for key in _keys(settings).list()]
        owners = [t for t in tenants if group in service.store.list_groups(t)]
        if not owners:
            raise click.ClickException(f"no group {group!r} in {settings.data}")
        for tenant in owners:

            def progress(done: int, total: int, made: int, tenant: str = tenant) -> None:
                click.echo(f"{tenant[:8]}…/{group}: {done}/{total} ({made} made)", err=True)

            try:
                counts = service.make_missing_thumbnails(tenant, group, progress)
            except StoreError as exc:  # the disk refused the pictures: say so, do not count them as made
                raise click.ClickException(f"{settings.data}: {exc.message}") from None
            click.echo(json.dumps({"access_key": tenant, "group": group, **counts}))
    finally:
        service.close()


# import, copy, groups, info, search (tusou/cli_data.py): clients of a running server.
for command in DATA_COMMANDS:
    main.add_command(command)
main.add_command(duplicates)


if __name__ == "__main__":
    main()
