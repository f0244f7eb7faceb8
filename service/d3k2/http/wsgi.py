"""WSGI entry point for gunicorn: ``gunicorn -c docker/gunicorn.conf.py d3k2.http.wsgi:app``.

Importing this module builds the application from the environment (D3K2_* variables), once per worker.
"""

from __future__ import annotations

import gc

from d3k2.config import from_env
from d3k2.http.app import create_app
from d3k2.http.logs import configure_logging

settings = from_env()
configure_logging(settings.log_level)
app = create_app(settings)
# What start-up built (rule set, value sets, modules) lives as long as the worker: out of the cyclic
# collector's sight, so that its full collections do not rescan it.
gc.freeze()
