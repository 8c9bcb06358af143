"""The ``tusou`` command: run the server and manage access keys.

Every option of ``tusou serve`` can also be set as an environment variable (``TUSOU_DATA``, ``TUSOU_PORT``,
...); see ``tusou/config.py`` for the full list.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from tusou.config import Settings
from tusou.store.keys import KeyStore

data_option = click.option(
    "--data",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Data folder (env TUSOU_DATA; default ./tusou-data).",
)


def _settings(**overrides: object) -> Settings:
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def _keys(settings: Settings) -> KeyStore:
    settings.data.mkdir(parents=True, exist_ok=True)
    return KeyStore(settings.data / "keys.db")


@click.group()
@click.version_option(package_name="tusou")
def main() -> None:
    """tusou (图搜): self-hosted search by image, wire-compatible with Qiniu's image search API."""


@main.command()
@data_option
@click.option("--host", default=None, help="Address to listen on (env TUSOU_HOST; default 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port (env TUSOU_PORT; default 8000).")
@click.option("--model", default=None, help="lite0, lite1, lite2 or onnx (env TUSOU_MODEL; default lite0).")
def serve(data: Path | None, host: str | None, port: int | None, model: str | None) -> None:
    """Start the HTTP server on the embedded store.

    On a first start with no access key, one is created and printed so that the API can be called at once.
    """
    import uvicorn

    from tusou.api.app import create_app

    settings = _settings(data=data, host=host, port=port, model=model)
    keys = _keys(settings)
    if keys.active_count() == 0:
        key = keys.create("default")
        click.echo("Created a first access key (keep the secret safe; `tusou keys list` shows it again):")
        click.echo(json.dumps({"access_key": key.access_key, "secret_key": key.secret_key}))
    click.echo(f"tusou serving {settings.data.resolve()} on http://{settings.host}:{settings.port}", err=True)
    app = create_app(settings, keys=keys)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info", access_log=False)


@main.group()
def keys() -> None:
    """Manage access keys: each key is a tenant that sees only its own groups."""


@keys.command("create")
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
    for key in _keys(_settings(data=data)).list():
        entry = {"access_key": key.access_key, "name": key.name, "revoked": key.revoked}
        if show_secrets:
            entry["secret_key"] = key.secret_key
        click.echo(json.dumps(entry))


@keys.command("revoke")
@data_option
@click.argument("access_key")
def keys_revoke(data: Path | None, access_key: str) -> None:
    """Revoke ACCESS_KEY: its requests are refused from then on (its groups stay on disk)."""
    if not _keys(_settings(data=data)).revoke(access_key):
        click.echo(f"no active key {access_key}", err=True)
        sys.exit(1)
    click.echo(f"revoked {access_key}")


if __name__ == "__main__":
    main()
