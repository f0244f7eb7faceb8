"""A real PostgreSQL server for tests, from Debian's packages (``apt-get install -y postgresql``; .ci/run
installs it). ``postgres_server`` starts one cluster per session on a free loopback port, with its socket
and data in a temporary directory; ``postgres_url`` gives each test a fresh database on it.

As root the cluster runs as the ``postgres`` user (initdb refuses root). Without the binaries the tests
are skipped with a banner on the terminal, unless D3K2_REQUIRE_POSTGRES=1 (set by CI) makes it a failure.
A server that is installed but does not start is always a failure, never a skip.
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import psycopg
import pytest

from builders import STARTUP_SECONDS
from fhir_server import free_port

REQUIRE_ENV = "D3K2_REQUIRE_POSTGRES"
SUPERUSER = "d3k2"
_databases = itertools.count(1)


@dataclass(frozen=True)
class PostgresServer:
    bin_dir: Path
    base: Path
    port: int
    run_as: str | None

    @property
    def data_dir(self) -> Path:
        return self.base / "data"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def _command(self, *args: str) -> list[str]:
        return ["runuser", "-u", self.run_as, "--", *args] if self.run_as else list(args)

    def pg_ctl(self, *args: str) -> None:
        command = self._command(str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), *args)
        result = subprocess.run(
            command, capture_output=True, text=True, check=False, timeout=STARTUP_SECONDS + 60
        )
        if result.returncode != 0:
            log = (self.base / "server.log").read_text(errors="replace") if self.started_once else ""
            pytest.fail(f"pg_ctl {args[0]} failed ({result.returncode}): {result.stderr}\n{log}")

    @property
    def started_once(self) -> bool:
        return (self.base / "server.log").exists()

    def start(self) -> None:
        options = f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 -c fsync=off"
        self.pg_ctl(
            "start", "-w", "-t", f"{STARTUP_SECONDS:.0f}", "-l", str(self.base / "server.log"), "-o", options
        )

    def stop(self) -> None:
        self.pg_ctl("stop", "-w", "-m", "fast")

    def create_database(self) -> str:
        name = f"d3k2_test_{next(_databases)}"
        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


def find_bin_dir() -> Path | None:
    """The newest /usr/lib/postgresql/<version>/bin with initdb and pg_ctl, else the ones on PATH."""
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    for bin_dir in candidates:
        if (bin_dir / "initdb").exists() and (bin_dir / "pg_ctl").exists():
            return bin_dir
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb and shutil.which("pg_ctl") else None


def _unavailable(reason: str) -> None:
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"PostgreSQL is required ({REQUIRE_ENV}=1) but {reason}")
    banner = "!" * 100
    sys.__stderr__.write(
        f"\n{banner}\nPOSTGRESQL TESTS SKIPPED: {reason}.\n"
        f"Install it (apt-get install -y postgresql) to run them; CI installs it.\n{banner}\n"
    )
    pytest.skip(f"PostgreSQL tests skipped LOUDLY: {reason}")


@contextmanager
def running_postgres() -> Iterator[PostgresServer]:
    """A fresh cluster, started; stopped and deleted on exit."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        _unavailable("no initdb/pg_ctl under /usr/lib/postgresql/*/bin or on PATH")
        raise AssertionError("unreachable")
    run_as: str | None = None
    base = Path(tempfile.mkdtemp(prefix="d3k2-pg-"))
    try:
        if os.geteuid() == 0:
            try:
                account = pwd.getpwnam("postgres")
            except KeyError:
                _unavailable("running as root and there is no 'postgres' user to run the server")
            run_as = account.pw_name
            os.chown(base, account.pw_uid, account.pw_gid)
        server = PostgresServer(bin_dir, base, 0, run_as)  # its port is picked once initdb is done
        initdb = server._command(
            str(bin_dir / "initdb"),
            "-D",
            str(server.data_dir),
            "-U",
            SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--no-locale",
            "--no-sync",
        )
        result = subprocess.run(initdb, capture_output=True, text=True, check=False, timeout=120)
        if result.returncode != 0:
            pytest.fail(f"initdb failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        # Picked just before the server binds it, not before initdb's seconds: a free port stays free only
        # until another program binds it.
        server = replace(server, port=free_port())
        server.start()
        try:
            yield server
        finally:
            if (server.data_dir / "postmaster.pid").exists():
                server.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    with running_postgres() as server:
        yield server


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """A new, empty database on the session's server."""
    return postgres_server.create_database()
