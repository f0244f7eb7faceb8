"""`make demo`: d3k2 and a local FHIR R4 server with demo patients, ready for the CDS Hooks sandbox.

Starts sekmet-fhir (a dev dependency) on D3K2_DEMO_FHIR_PORT (default 8090), loads every transaction Bundle
in fixtures/demo/ into it, starts `d3k2 serve` (dev profile, embedded defaults) on D3K2_DEMO_PORT (default
8080) with D3K2_FHIR_ALLOWED naming only that FHIR server, and prints the discovery URL, the FHIR URL and,
for each demo patient, the sandbox URL with the parameters the sandbox reads (serviceDiscoveryURL,
fhirServiceUrl, patientId). Ctrl-C (or SIGTERM) stops both servers and removes their data.

Dates: the Bundles are written as of DATED (the day the project's fixtures call "today"). At load time every
FHIR date and dateTime in them is moved by (today - DATED) days, birth dates included, so results keep their
age and patients theirs. `--today YYYY-MM-DD` picks the day (tests pass it); default the real today.

D3K2_TRUST_FILE defaults to docker/trust/cds-sandbox.toml, so `D3K2_AUTH=required make demo` accepts the
sandbox's tokens without fetching its key. D3K2_DEMO_SANDBOX_URL replaces the public sandbox's address
(https://sandbox.cds-hooks.org/) with a self-hosted one.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from datetime import date, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

REPO = Path(__file__).resolve().parent.parent
PATIENTS = REPO / "fixtures" / "demo"
SANDBOX_TRUST = REPO / "docker" / "trust" / "cds-sandbox.toml"
DATED = date(2026, 11, 24)
HOST = "127.0.0.1"
PUBLIC_SANDBOX = "https://sandbox.cds-hooks.org/"
STARTUP_SECONDS = 60.0
STOP_SECONDS = 10.0
# A FHIR date or dateTime: YYYY-MM-DD, optionally followed by a time. Partial dates (YYYY, YYYY-MM) are
# left alone; the demo files use none.
DATE = re.compile(r"^(\d{4}-\d{2}-\d{2})(T[0-9:.]+(?:Z|[+-]\d{2}:\d{2})?)?$")


class Stop(Exception):
    """Ctrl-C (SIGINT) or SIGTERM."""


def shift_dates(value: Any, days: int) -> Any:
    """A copy of ``value`` (parsed JSON) with every date and dateTime string moved by ``days``."""
    if isinstance(value, dict):
        return {key: shift_dates(item, days) for key, item in value.items()}
    if isinstance(value, list):
        return [shift_dates(item, days) for item in value]
    if isinstance(value, str) and (match := DATE.match(value)):
        moved = date.fromisoformat(match.group(1)) + timedelta(days=days)
        return moved.isoformat() + (match.group(2) or "")
    return value


def demo_bundles(today: date) -> dict[str, dict[str, Any]]:
    """Each demo case (file stem) → its transaction Bundle, dated for ``today``."""
    days = (today - DATED).days
    return {
        path.stem: shift_dates(json.loads(path.read_text(encoding="utf-8")), days)
        for path in sorted(PATIENTS.glob("*.json"))
    }


def the_patient(bundle: dict[str, Any]) -> dict[str, Any]:
    patients = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient"]
    if len(patients) != 1:
        raise SystemExit("demo: each fixtures/demo Bundle must hold exactly one Patient")
    return patients[0]


def sandbox_url(sandbox: str, discovery: str, fhir: str, patient_id: str) -> str:
    """The sandbox reads these three query parameters at start-up (tests/data/sandbox/README.md)."""
    query = urlencode({"serviceDiscoveryURL": discovery, "fhirServiceUrl": fhir, "patientId": patient_id})
    return f"{sandbox}?{query}"


def wait_until_up(url: str, process: subprocess.Popen[bytes], name: str, log: Path | None) -> None:
    end = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < end and process.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    state = f"exited with {process.returncode}" if process.poll() is not None else "did not answer"
    # The log is in the working directory, removed on exit: show its end (a port in use, most often).
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:]) if log else "(see above)"
    raise SystemExit(f"demo: {name} {state} ({url}); its log ends:\n{tail}")


def load(fhir: str, bundle: dict[str, Any]) -> None:
    request = urllib.request.Request(
        fhir,
        data=json.dumps(bundle).encode(),
        headers={"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30):
            return
    except urllib.error.HTTPError as exc:
        with exc:
            detail = exc.read().decode(errors="replace")[:2000]
        raise SystemExit(f"demo: the FHIR server refused a demo Bundle (HTTP {exc.code}): {detail}") from None


def start_fhir(port: int, workdir: Path) -> tuple[subprocess.Popen[bytes], str, Path]:
    base = f"http://{HOST}:{port}/fhir"
    config = workdir / "sekmet.yaml"
    config.write_text(json.dumps({"simulator": {"enabled": False}, "log_inbound": False}))  # JSON is YAML
    log = workdir / "sekmet.log"
    env = {**os.environ, "SEKMET_BASE_URL": base, "SEKMET_DB": str(workdir / "sekmet.db")}
    argv = [str(Path(sys.executable).parent / "sekmet"), "serve", "-c", str(config)]
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*argv, "--host", HOST, "--port", str(port)],
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches the launcher only, which stops the servers in order
        )
    return process, base, log


def start_d3k2(port: int, fhir_port: int, workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """`d3k2 serve` as `make run` starts it (JSON log lines on this terminal's stderr); its base URL."""
    env = {
        **os.environ,
        "D3K2_ENV": os.environ.get("D3K2_ENV", "dev"),
        "D3K2_DATA_DIR": str(workdir / "d3k2"),
        "D3K2_FHIR_ALLOWED": f"http://{HOST}:{fhir_port}",
        "D3K2_TRUST_FILE": os.environ.get("D3K2_TRUST_FILE", str(SANDBOX_TRUST)),
    }
    argv = [str(Path(sys.executable).parent / "d3k2"), "serve", "--host", HOST, "--port", str(port)]
    process = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
    return process, f"http://{HOST}:{port}"


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(timeout=STOP_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def banner(discovery: str, fhir: str, bundles: dict[str, dict[str, Any]], sandbox: str) -> str:
    lines = [
        "",
        f"d3k2 discovery:   {discovery}",
        f"FHIR R4 server:   {fhir}",
        f"Preview page:     {discovery.removesuffix('/cds-services')}/preview",
        "",
        "Open a patient in the CDS Hooks sandbox (patient-view fires at once; Rx View and Rx Sign call the"
        " order hooks):",
    ]
    for case, bundle in bundles.items():
        patient = the_patient(bundle)
        name = patient["name"][0]
        who = f"{' '.join(name['given'])} {name['family']}, {patient['gender']}, born {patient['birthDate']}"
        lines += [f"  {case}: {who}", f"    {sandbox_url(sandbox, discovery, fhir, patient['id'])}"]
    lines += ["", "Press Ctrl-C to stop both servers.", ""]
    return "\n".join(lines)


def _terminated(_signum: int, _frame: Any) -> None:
    raise Stop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--today", type=date.fromisoformat, default=date.today(), help="YYYY-MM-DD")
    args = parser.parse_args()
    port = int(os.environ.get("D3K2_DEMO_PORT", "8080"))
    fhir_port = int(os.environ.get("D3K2_DEMO_FHIR_PORT", "8090"))
    sandbox = os.environ.get("D3K2_DEMO_SANDBOX_URL", PUBLIC_SANDBOX)
    # Explicit handlers: a shell that starts the launcher in the background leaves SIGINT ignored.
    signal.signal(signal.SIGINT, _terminated)
    signal.signal(signal.SIGTERM, _terminated)
    workdir = Path(tempfile.mkdtemp(prefix="d3k2-demo-"))
    started: list[subprocess.Popen[bytes]] = []
    try:
        bundles = demo_bundles(args.today)
        fhir_process, fhir, fhir_log = start_fhir(fhir_port, workdir)
        started.append(fhir_process)
        wait_until_up(f"{fhir}/metadata", fhir_process, "the FHIR server (sekmet)", fhir_log)
        for bundle in bundles.values():
            load(fhir, bundle)
        d3k2_process, base = start_d3k2(port, fhir_port, workdir)
        started.append(d3k2_process)
        wait_until_up(f"{base}/readyz", d3k2_process, "d3k2", None)
        print(banner(f"{base}/cds-services", fhir, bundles, sandbox), flush=True)
        while all(process.poll() is None for process in started):
            time.sleep(0.5)
        raise SystemExit("demo: a server stopped on its own; stopping the other")
    except Stop:
        print("demo: stopping", flush=True)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C does not cut the clean-up short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for process in reversed(started):
            stop(process)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
