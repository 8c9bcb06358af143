"""Bulk import into a group over the API: sources (folders, manifests), batching, resume, a report.

Used by ``tusou import`` and ``tusou copy`` (``tusou/cli_data.py``); only talks to a server through
:class:`tusou.client.Client`, so it works against tusou and any Qiniu-compatible server.

Resume: the ids already in the group are read through the list API first and skipped; an image the server
answers "id already exists" for (an earlier run's request that landed although its answer was lost) is
counted as skipped too. Run again after an interruption, an import ends with every image exactly once.
"""

from __future__ import annotations

import csv
import io
import json
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote

from tusou.client import Client, Image, TusouError, data_uri

# What tusou (and Qiniu) accept; other files in a folder are not images and are left alone.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif"})
MANIFEST_FIELDS = ("uri", "id", "label", "desc")
ALREADY_EXISTS = "id already exists"
GROUP_EXISTS = "group already exists"


@dataclass
class Item:
    """One image to send. ``uri`` is an http(s)/data URI, or ``path`` is a local file sent as a data URI."""

    id: str
    where: str  # for reports: "photos/a.jpg" or "list.csv:12"
    uri: str | None = None
    path: Path | None = None
    label: str | None = None
    desc: Any = None
    size: int = 0  # bytes this item adds to a request body (roughly)

    def to_image(self) -> Image:
        uri = self.uri if self.path is None else data_uri(self.path)
        assert uri is not None
        return Image(uri, id=self.id, label=self.label, desc=self.desc)


@dataclass
class Failure:
    where: str
    id: str | None
    message: str
    code: int | None = None
    uri: str | None = None  # a URL or file path (never a data URI): enough to fix the row and run again

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"where": self.where, "id": self.id, "code": self.code, "message": self.message}
        if self.uri is not None:
            out["uri"] = self.uri
        return out


@dataclass
class Report:
    added: int = 0
    skipped: int = 0
    failures: list[Failure] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def failed(self) -> int:
        return len(self.failures)

    @property
    def done(self) -> int:
        return self.added + self.skipped + self.failed

    def by_reason(self) -> dict[str, int]:
        return dict(Counter(f.message for f in self.failures).most_common())

    def summary(self) -> dict[str, Any]:
        return {
            "added": self.added,
            "skipped": self.skipped,
            "failed": self.failed,
            "reasons": self.by_reason(),
        }


# ----------------------------------------------------------------------------------------------------------
# Sources


class SourceError(Exception):
    """A source that cannot be read at all (missing folder, unknown manifest type)."""


def folder_items(root: Path, label: str | None = None) -> Iterator[Item]:
    """Every image file under ``root`` (recursive, sorted); its id is the path relative to ``root``."""
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
        rel = path.relative_to(root).as_posix()
        yield Item(id=rel, where=rel, path=path, label=label, size=path.stat().st_size * 4 // 3 + 256)


def _parse_desc(value: Any) -> Any:
    """A CSV cell: JSON when it parses as JSON, else the text itself; empty = no desc."""
    if not isinstance(value, str):
        return value
    if value == "":
        return None
    try:
        return json.loads(value)
    except ValueError:
        return value


def _row_item(row: dict[str, Any], where: str, base: Path, label: str | None) -> Item | Failure:
    uri = row.get("uri")
    raw_id = row.get("id")
    image_id = None if raw_id is None or raw_id == "" else str(raw_id)
    if not isinstance(uri, str) or not uri.strip():
        return Failure(where, image_id, "missing uri")
    if image_id is None:
        return Failure(where, None, "missing id", uri=uri)
    row_label = row.get("label")
    item = Item(
        id=image_id,
        where=where,
        label=str(row_label) if row_label not in (None, "") else label,
        desc=_parse_desc(row.get("desc")),
    )
    uri = uri.strip()
    if uri.startswith(("http://", "https://", "data:")):
        item.uri, item.size = uri, len(uri) + 256
        return item
    # Anything else is a local file, relative to the manifest's folder.
    path = (base / uri).expanduser()
    if not path.is_file():
        return Failure(where, image_id, "file not found", uri=uri)
    item.path, item.size = path, path.stat().st_size * 4 // 3 + 256
    return item


def manifest_items(
    stream: TextIO, name: str, kind: str, base: Path, label: str | None = None
) -> Iterator[Item | Failure]:
    """Rows of a ``jsonl`` or ``csv`` manifest (fields uri, id, label, desc) as items, or as failures."""
    if kind == "jsonl":
        for n, line in enumerate(stream, 1):
            if not line.strip():
                continue
            where = f"{name}:{n}"
            try:
                row = json.loads(line)
            except ValueError:
                yield Failure(where, None, "invalid json")
                continue
            if not isinstance(row, dict):
                yield Failure(where, None, "invalid json")
                continue
            yield _row_item(row, where, base, label)
    elif kind == "csv":
        reader = csv.DictReader(stream)
        if reader.fieldnames is None or "uri" not in reader.fieldnames:
            raise SourceError(f"{name}: a csv manifest needs a header row with uri,id[,label,desc]")
        for row in reader:
            yield _row_item(row, f"{name}:{reader.line_num}", base, label)
    else:
        raise SourceError(f"{name}: unknown manifest type {kind!r}")


def source_items(source: str, stdin: TextIO, label: str | None = None) -> Iterator[Item | Failure]:
    """A folder, a ``.jsonl``/``.csv`` manifest, or ``-``: a manifest on stdin (jsonl if it starts with {)."""
    if source == "-":
        text = stdin.read()
        kind = "jsonl" if text.lstrip().startswith("{") else "csv"
        yield from manifest_items(io.StringIO(text), "stdin", kind, Path.cwd(), label)
        return
    path = Path(source)
    if path.is_dir():
        yield from folder_items(path, label)
        return
    if not path.is_file():
        raise SourceError(f"{source}: no such file or folder")
    manifest_kind = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}.get(path.suffix.lower())
    if manifest_kind is None:
        raise SourceError(f"{source}: not a folder, .jsonl or .csv manifest")
    with path.open(encoding="utf-8-sig", newline="") as stream:
        yield from manifest_items(stream, path.name, manifest_kind, path.parent, label)


def uri_from_template(template: str, image_id: str) -> str:
    """``https://cdn.example.com/{id}`` with the id percent-encoded (slashes kept, as in a path)."""
    return template.replace("{id}", quote(image_id, safe="/"))


# ----------------------------------------------------------------------------------------------------------
# Sending


def ensure_group(client: Client, group: str) -> bool:
    """Create ``group`` (empty) unless it exists; True when this call created it."""
    if client.group_exists(group):
        return False
    try:
        client.new_group(group, [])
    except TusouError as exc:
        if exc.message != GROUP_EXISTS:  # another importer made it meanwhile: fine
            raise
        return False
    return True


def batches(items: Iterable[Item], max_images: int, max_bytes: int) -> Iterator[list[Item]]:
    batch: list[Item] = []
    size = 0
    for item in items:
        if batch and (len(batch) >= max_images or size + item.size > max_bytes):
            yield batch
            batch, size = [], 0
        batch.append(item)
        size += item.size
    if batch:
        yield batch


def _shown_uri(item: Item) -> str | None:
    if item.path is not None:
        return str(item.path.resolve())
    if item.uri is not None and not item.uri.startswith("data:"):
        return item.uri
    return None


def send_batch(client: Client, group: str, batch: list[Item], report: Report) -> None:
    """One add request for ``batch``; every image ends as added, skipped or a failure in ``report``."""
    images: list[Image] = []
    ready: list[Item] = []
    failures: list[Failure] = []
    for item in batch:
        try:
            images.append(item.to_image())
            ready.append(item)
        except OSError as exc:
            failures.append(
                Failure(item.where, item.id, f"cannot read file: {exc.strerror}", uri=_shown_uri(item))
            )
    added = skipped = 0
    if images:
        try:
            result = client.add_images(group, images)
        except TusouError as exc:
            for item in ready:
                failures.append(
                    Failure(item.where, item.id, exc.message, exc.status or None, _shown_uri(item))
                )
        else:
            for item, error in zip(ready, result.errors, strict=False):
                if error is None:
                    added += 1
                elif error.get("message") == ALREADY_EXISTS:
                    skipped += 1
                else:
                    failures.append(
                        Failure(
                            item.where,
                            item.id,
                            str(error.get("message")),
                            error.get("code"),
                            _shown_uri(item),
                        )
                    )
    with report._lock:
        report.added += added
        report.skipped += skipped
        report.failures.extend(failures)


def run_import(
    client: Client,
    group: str,
    items: Iterable[Item | Failure],
    *,
    batch_size: int = 32,
    batch_bytes: int = 32 * 1024 * 1024,
    concurrency: int = 4,
    progress: Callable[[Report], None] | None = None,
    on_total: Callable[[int], None] | None = None,
) -> Report:
    """Send ``items`` to ``group`` (created if missing), skipping the ids it already holds.

    Source failures (bad rows) go straight into the report; an id that appears twice in the source is a
    failure the second time (the first one wins). At most ``concurrency`` requests are in flight.
    """
    report = Report()
    ensure_group(client, group)
    present = {image.id for image in client.iter_images(group)}
    todo: list[Item] = []
    seen: set[str] = set()
    for entry in items:
        if isinstance(entry, Failure):
            report.failures.append(entry)
        elif entry.id in seen:
            report.failures.append(
                Failure(entry.where, entry.id, "duplicate id in source", uri=_shown_uri(entry))
            )
        elif entry.id in present:
            seen.add(entry.id)
            report.skipped += 1
        else:
            seen.add(entry.id)
            todo.append(entry)
    if on_total is not None:
        on_total(report.done + len(todo))
    if progress is not None:
        progress(report)
    with ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="tusou-import") as pool:
        pending: set[Future[None]] = set()

        def settle(limit: int) -> set[Future[None]]:
            left = pending
            while len(left) > limit:
                done, left = wait(left, return_when=FIRST_COMPLETED)
                for future in done:
                    future.result()
                if progress is not None:
                    progress(report)
            return left

        for batch in batches(todo, batch_size, batch_bytes):
            # Bounded: file contents are read only for the batches in flight.
            pending = settle(concurrency * 2 - 1)
            pending.add(pool.submit(send_batch, client, group, batch, report))
        settle(0)
    return report


def write_failures(path: Path, failures: list[Failure]) -> None:
    """One JSON object a line; rows that had a URL or file keep it as ``uri``, so the file can be fixed and
    imported again as a manifest."""
    with path.open("w", encoding="utf-8") as out:
        for failure in failures:
            out.write(json.dumps(failure.to_json(), ensure_ascii=False) + "\n")
