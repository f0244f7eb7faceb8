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
# A request's objects hold no reference cycles and die with the answer, but a large prefetch (a 7 MB lab
# history) allocates hundreds of thousands of them: at the default threshold (700) the collector would rescan
# them over and over while they are parsed (BENCHMARKS.md, history). Collections stay on, just less often.
gc.set_threshold(50_000, 20, 20)
