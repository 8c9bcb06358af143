"""The ``tusou`` commands that talk to a running server: import, copy, groups, info, search.

They go through :mod:`tusou.client` like any other client, so they work against a tusou on another machine
(and, except for tusou's additions, against any Qiniu-compatible server). The server is ``--server`` or
``TUSOU_SERVER``; the key comes from the environment only (``TUSOU_ACCESS_KEY``, ``TUSOU_SECRET_KEY``),
never from the command line, where other users of the machine could read it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import click

from tusou.client import Client, TusouError, data_uri
from tusou.transfer import (
    Failure,
    Item,
    Report,
    SourceError,
    manifest_items,
    run_import,
    source_items,
    uri_from_template,
    write_failures,
)

DEFAULT_SERVER = "http://127.0.0.1:8000"

server_option = click.option(
    "--server",
    envvar="TUSOU_SERVER",
    default=DEFAULT_SERVER,
    show_default=True,
    help="The tusou (or Qiniu-compatible) server (env TUSOU_SERVER). The access key is read from the "
    "environment only: TUSOU_ACCESS_KEY and TUSOU_SECRET_KEY.",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


def _client(server: str, prefix: str = "TUSOU") -> Client:
    access_key = os.environ.get(f"{prefix}_ACCESS_KEY")
    secret_key = os.environ.get(f"{prefix}_SECRET_KEY")
    if not access_key or not secret_key:
        raise click.UsageError(f"set {prefix}_ACCESS_KEY and {prefix}_SECRET_KEY in the environment")
    said: list[str] = []

    def on_retry(why: str, wait_s: float) -> None:
        # The client tries a refused connection again for a while (a server restarting): say so once,
        # or a command run with no server up would wait silently.
        if why.startswith("cannot connect") and not said:
            said.append(why)
            click.echo(f"{why}; trying again for up to {patience_s:.0f} s (is the server running?)", err=True)

    try:
        client = Client(server, access_key, secret_key, on_retry=on_retry)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    patience_s = sum(min(client.backoff_s * 2**n, client.max_backoff_s) for n in range(client.retries))
    return client


def _fail(exc: TusouError) -> NoReturn:
    click.echo(f"error: {exc}", err=True)
    sys.exit(1)


# ----------------------------------------------------------------------------------------------------------
# Progress: a bar on a terminal, plain lines otherwise (logs, CI, pipes)


class Progress:
    def __init__(self, what: str, plain_every_s: float = 5.0) -> None:
        self.what = what
        self.total = 0
        self.bar: Any = None
        self.plain_every_s = plain_every_s
        self.last_line = 0.0
        self.started = time.monotonic()

    def set_total(self, total: int) -> None:
        self.total = total
        if sys.stderr.isatty():
            from tqdm import tqdm  # type: ignore[import-untyped]

            self.bar = tqdm(total=total, desc=self.what, unit="img", file=sys.stderr, dynamic_ncols=True)
        else:
            click.echo(f"{self.what}: {total} images in the source", err=True)

    def __call__(self, report: Report) -> None:
        counts = f"added {report.added}, skipped {report.skipped}, failed {report.failed}"
        if self.bar is not None:
            self.bar.n = report.done
            self.bar.set_postfix_str(counts, refresh=False)
            self.bar.refresh()
            return
        now = time.monotonic()
        if now - self.last_line >= self.plain_every_s or report.done >= self.total:
            self.last_line = now
            click.echo(f"{self.what}: {report.done}/{self.total} ({counts})", err=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _finish(report: Report, failures_path: Path, as_json: bool, started: float) -> NoReturn:
    elapsed = time.monotonic() - started
    if report.failures:
        write_failures(failures_path, report.failures)
    if as_json:
        click.echo(json.dumps({**report.summary(), "seconds": round(elapsed, 2)}, ensure_ascii=False))
    else:
        click.echo(
            f"added {report.added}, skipped {report.skipped} (already there), "
            f"failed {report.failed} in {elapsed:.1f} s"
        )
        for reason, count in report.by_reason().items():
            click.echo(f"  {count} failed: {reason}")
        if report.failures:
            click.echo(f"failures written to {failures_path}")
    sys.exit(1 if report.failures else 0)


transfer_options = [
    click.option("--batch-size", default=32, show_default=True, help="Images in one request (1-1000)."),
    click.option("--concurrency", default=4, show_default=True, help="Requests in flight at once."),
    click.option(
        "--failures",
        "failures_path",
        type=click.Path(dir_okay=False, path_type=Path),
        default=Path("tusou-failures.jsonl"),
        show_default=True,
        help="Where to write the images that failed (JSON lines; written only when some did).",
    ),
    json_option,
]


def _with_transfer_options(fn: Any) -> Any:
    for option in reversed(transfer_options):
        fn = option(fn)
    return fn


def _transfer(
    client: Client,
    group: str,
    items: Any,
    what: str,
    batch_size: int,
    concurrency: int,
    failures_path: Path,
    as_json: bool,
) -> None:
    if not 1 <= batch_size <= 1000:
        raise click.UsageError("--batch-size must be 1..1000")
    started = time.monotonic()
    progress = Progress(what)
    try:
        # The whole source is read before the group is created: a missing file, a bad manifest or a
        # source group that does not exist stops here and leaves no empty group behind.
        entries = list(items)
        report = run_import(
            client,
            group,
            entries,
            batch_size=batch_size,
            concurrency=max(1, concurrency),
            progress=progress,
            on_total=progress.set_total,
        )
    except SourceError as exc:
        raise click.UsageError(str(exc)) from exc
    except TusouError as exc:
        _fail(exc)
    finally:
        progress.close()
        client.close()
    _finish(report, failures_path, as_json, started)


# ----------------------------------------------------------------------------------------------------------
# Commands


@click.command("import")
@click.argument("group")
@click.argument("sources", nargs=-1, required=True)
@server_option
@click.option("--label", default=None, help="Label for images whose source gives none.")
@_with_transfer_options
def import_(
    group: str,
    sources: tuple[str, ...],
    server: str,
    label: str | None,
    batch_size: int,
    concurrency: int,
    failures_path: Path,
    as_json: bool,
) -> None:
    """Add images to GROUP (created if missing) from each SOURCE.

    SOURCE is a folder (recursive; an image's id is its path relative to the folder), a .jsonl or .csv
    manifest with fields uri, id, label, desc (uri: http(s) URL, data URI, or a file path relative to the
    manifest; desc: JSON), or - for a manifest on stdin. Ids already in the group are skipped, so an
    interrupted import can simply be run again. Exit status 0 only when no image failed.
    """
    client = _client(server)

    def items() -> Any:
        for source in sources:
            yield from source_items(source, sys.stdin, label)

    _transfer(client, group, items(), f"import {group}", batch_size, concurrency, failures_path, as_json)


@click.command("copy", short_help="Copy a group from another (Qiniu or tusou) server.")
@click.argument("src_group")
@click.argument("dst_group", required=False)
@click.option(
    "--from",
    "source_server",
    required=True,
    help="The source server, e.g. http://ai.qiniuapi.com (key: TUSOU_FROM_ACCESS_KEY/TUSOU_FROM_SECRET_KEY).",
)
@server_option
@click.option("--uri-template", default=None, help="Where each image is: 'https://cdn.example.com/{id}'.")
@click.option(
    "--manifest",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="A .jsonl/.csv manifest mapping id to uri (instead of --uri-template).",
)
@_with_transfer_options
def copy(
    src_group: str,
    dst_group: str | None,
    source_server: str,
    server: str,
    uri_template: str | None,
    manifest: Path | None,
    batch_size: int,
    concurrency: int,
    failures_path: Path,
    as_json: bool,
) -> None:
    """Copy SRC_GROUP from the --from server into DST_GROUP (default: the same name) on --server.

    Ids, labels and desc come from the source's list API. Qiniu's list does not return image URIs, so each
    image is fetched by the destination server from --uri-template ({id} is replaced by the percent-encoded
    id) or from the uri a --manifest gives its id. Resumable like import.
    """
    if (uri_template is None) == (manifest is None):
        raise click.UsageError("give exactly one of --uri-template and --manifest")
    if uri_template is not None and "{id}" not in uri_template:
        raise click.UsageError("--uri-template must contain {id}")
    source = _client(source_server, "TUSOU_FROM")
    destination = _client(server)
    uris: dict[str, str] = {}
    if manifest is not None:
        kind = "csv" if manifest.suffix.lower() == ".csv" else "jsonl"
        with manifest.open(encoding="utf-8-sig", newline="") as stream:
            for entry in manifest_items(stream, manifest.name, kind, manifest.parent):
                if isinstance(entry, Item):
                    uris[entry.id] = entry.uri or str(entry.path)

    def items() -> Any:
        for image in source.iter_images(src_group):
            where = f"{src_group}/{image.id}"
            uri = (
                uri_from_template(uri_template, image.id) if uri_template is not None else uris.get(image.id)
            )
            if uri is None:
                yield Failure(where, image.id, "no uri in the manifest")
                continue
            item = Item(image.id, where, label=image.label, desc=None if image.desc == "" else image.desc)
            if uri.startswith(("http://", "https://", "data:")):
                item.uri, item.size = uri, len(uri) + 256
            else:
                item.path = Path(uri)
                item.size = item.path.stat().st_size * 4 // 3 + 256 if item.path.is_file() else 0
            yield item

    try:
        _transfer(
            destination,
            dst_group or src_group,
            items(),
            f"copy {src_group}",
            batch_size,
            concurrency,
            failures_path,
            as_json,
        )
    finally:
        source.close()


@click.command("groups")
@server_option
@json_option
def groups(server: str, as_json: bool) -> None:
    """List your groups, one a line."""
    with _client(server) as client:
        try:
            names = client.list_groups()
        except TusouError as exc:
            _fail(exc)
    if as_json:
        click.echo(json.dumps(names, ensure_ascii=False))
    else:
        for name in names:
            click.echo(name)


@click.command("info")
@click.argument("group")
@server_option
@json_option
def info(group: str, server: str, as_json: bool) -> None:
    """How many images GROUP holds."""
    with _client(server) as client:
        try:
            count = client.count(group)
        except TusouError as exc:
            _fail(exc)
    if as_json:
        click.echo(json.dumps({"group": group, "count": count}, ensure_ascii=False))
    else:
        click.echo(f"{group}: {count} images")


def _image_uri(image: str) -> str:
    if image.startswith(("http://", "https://", "data:")):
        return image
    path = Path(image)
    if not path.is_file():
        raise click.UsageError(f"{image}: no such file (give a file path or an http(s) URL)")
    return data_uri(path)


def _cell(value: Any, width: int) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= width else text[: width - 1] + "…"


@click.command("search", short_help="Search GROUP with an image file or URL.")
@click.argument("group")
@click.argument("image")
@server_option
@click.option("--limit", default=10, show_default=True, help="Most hits (1-10000, or -1 for all matches).")
@click.option("--threshold", type=float, default=None, help="Lowest score (0..1; default: the server's).")
@json_option
def search(group: str, image: str, server: str, limit: int, threshold: float | None, as_json: bool) -> None:
    """Search GROUP with IMAGE (a file or an http(s) URL); best hits first."""
    uri = _image_uri(image)
    with _client(server) as client:
        try:
            hits = client.search([group], uri, limit=limit, threshold=threshold)
        except TusouError as exc:
            _fail(exc)
    if as_json:
        rows = [{"id": h.id, "score": h.score, "label": h.label, "desc": h.desc, "uri": h.uri} for h in hits]
        click.echo(json.dumps(rows, ensure_ascii=False))
        return
    if not hits:
        click.echo("no match")
        return
    table = [("score", "id", "label", "desc")] + [
        (f"{h.score:.4f}", _cell(h.id, 48), _cell(h.label, 24), _cell(h.desc, 40)) for h in hits
    ]
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    for row in table:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


@click.command("backup", short_help="Back up --data into a new folder (safe while serving).")
@click.argument("dest", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--data",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="The data folder to back up (env TUSOU_DATA; default ./tusou-data).",
)
@json_option
def backup(dest: Path, data: Path | None, as_json: bool) -> None:
    """Copy the records and keys of --data into the new folder DEST, with a checksum manifest.

    Safe while the server runs and writes: every write acknowledged before the backup started is in it.
    The search index is not copied; the server rebuilds it on its first start after a restore.
    """
    from tusou.backup import BackupError
    from tusou.backup import backup as take_backup
    from tusou.cli import _settings  # here: tusou.cli imports this module

    folder = data if data is not None else _settings().data
    try:
        result = take_backup(folder, dest)
    except BackupError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    summary = {
        "dest": str(dest),
        "groups": result.groups,
        "images": result.images,
        "bytes": sum(f["bytes"] for f in result.files.values()),
        "seconds": round(result.seconds, 2),
    }
    if as_json:
        click.echo(json.dumps(summary))
    else:
        click.echo(
            f"backed up {result.groups} groups, {result.images} images ({summary['bytes']} bytes) "
            f"to {dest} in {result.seconds:.1f} s"
        )


@click.command("restore", short_help="Verify a backup and restore it into a new folder.")
@click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--data",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="The data folder to restore into (new, or holding no tusou data).",
)
def restore(src: Path, data: Path) -> None:
    """Verify the backup in SRC (sizes, checksums, SQLite check) and restore it into --data.

    A damaged or partial backup is refused and nothing is written. Start `tusou serve --data` afterwards:
    its first start rebuilds the search index.
    """
    from tusou.backup import BackupError
    from tusou.backup import restore as restore_backup

    try:
        manifest = restore_backup(src, data)
    except BackupError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    click.echo(
        f"restored {manifest['groups']} groups, {manifest['images']} images "
        f"(backup of {manifest['created']}) into {data}"
    )


COMMANDS = [import_, copy, groups, info, search, backup, restore]
