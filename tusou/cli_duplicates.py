"""``tusou duplicates GROUP``: clusters of near-duplicates in a group of a running server."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click

from tusou.cli_data import _client, _fail, json_option, server_option
from tusou.client import TusouError


@click.command("duplicates", short_help="List clusters of near-duplicates in GROUP.")
@click.argument("group")
@server_option
@click.option("--threshold", type=float, default=None, help="Least score of a pair (0..1; default 0.85).")
@click.option(
    "--page",
    "page_size",
    type=click.IntRange(1, 1000),
    default=200,
    show_default=True,
    help="Images scanned per request.",
)
@json_option
def duplicates(group: str, server: str, threshold: float | None, page_size: int, as_json: bool) -> None:
    """List clusters of near-duplicates in GROUP, the largest first (each image searched in the group)."""
    bar: Any = None
    last = [0.0]

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if sys.stderr.isatty():
            if bar is None:
                from tqdm import tqdm  # type: ignore[import-untyped]

                bar = tqdm(total=total, desc=f"duplicates {group}", unit="img", file=sys.stderr)
            bar.n = done
            bar.refresh()
        elif time.monotonic() - last[0] >= 5.0 or done >= total:
            last[0] = time.monotonic()
            click.echo(f"duplicates {group}: {done}/{total} images scanned", err=True)

    with _client(server) as client:
        try:
            found = client.duplicates(group, threshold=threshold, page_size=page_size, progress=progress)
        except TusouError as exc:
            _fail(exc)
        finally:
            if bar is not None:
                bar.close()
    if as_json:
        rows = [
            {"images": c.images, "pairs": [{"ids": [p.a, p.b], "score": p.score} for p in c.pairs]}
            for c in found
        ]
        click.echo(json.dumps(rows, ensure_ascii=False))
        return
    if not found:
        click.echo("no near-duplicates")
        return
    for n, cluster in enumerate(found, 1):
        best = cluster.pairs[0].score
        click.echo(f"{n}. {len(cluster.images)} images (best pair {best:.4f}): " + ", ".join(cluster.images))
