"""The `d3k2` command: serve, replay, explain."""

from __future__ import annotations

import logging
import sys

import click

from d3k2.config import from_env
from d3k2.errors import D3K2Error


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stderr
    )


@click.group()
@click.version_option(package_name="d3k2")
def main() -> None:
    """d3k2: CDS Hooks service for vitamin D3 / K2 decision support."""


@main.command()
@click.option("--host", default=None, help="Address to bind (D3K2_HOST, default 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port (D3K2_PORT, default 8080).")
@click.option(
    "--profile", default=None, help="Threshold profile: seed, endocrine-2011, iom-2011 (D3K2_PROFILE)."
)
def serve(host: str | None, port: int | None, profile: str | None) -> None:
    """Start the service with Flask's server (for production use gunicorn, see docker/)."""
    from d3k2.app import create_app

    try:
        settings = from_env().with_overrides(host=host, port=port, profile=profile)
        _setup_logging(settings.log_level)
        app = create_app(settings)
    except D3K2Error as exc:
        raise click.ClickException(exc.detail) from exc
    click.echo(
        f"d3k2: serving http://{settings.host}:{settings.port}/cds-services (profile {settings.profile})"
    )
    app.run(host=settings.host, port=settings.port, debug=False, use_reloader=False, threaded=True)


if __name__ == "__main__":
    main()
