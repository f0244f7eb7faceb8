"""`make bench`: d3k2 against a bare Flask ceiling, same machine, same gunicorn, same load generator.

Starts a local FHIR server (sekmet-fhir) with one patient, a bare Flask app twice (orjson, and the
standard json module) and d3k2, all under gunicorn with the same worker count and class, then drives
each scenario with wrk at one concurrency for both apps and prints throughput, p50, p99 and the
ratio d3k2 / bare; then the typical call with D3K2_AUTH=required against the same call with auth off
(bench/auth.py). Traffic goes to 127.0.0.1 only. Results are also written as JSON (--json); --only runs
some of the scenarios.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

import auth
import requests
import scenarios

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
LUA = HERE / "post.lua"
TODAY = scenarios.TODAY.isoformat()
SERVICE = {"typical": "d3k2-patient-view", "history": "d3k2-patient-view", "fallback": "d3k2-patient-view"}
SERVICE["order-sign"] = "d3k2-order-sign"
SERVICE["history-prefetched"] = "d3k2-patient-view"
SCENARIOS = ("typical", "order-sign", "history", "fallback", "auth")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(url: str, process: subprocess.Popen[bytes], log: Path, seconds: float = 60.0) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if process.poll() is not None:
            break
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except urllib.error.HTTPError:
            return  # it answers: up
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.1)
    sys.exit(f"bench: {url} did not come up; log {log}:\n{log.read_text(errors='replace')[-3000:]}")


@contextmanager
def started(
    name: str, argv: list[str], env: dict[str, str], probe: str, workdir: Path
) -> Iterator[subprocess.Popen[bytes]]:
    log = workdir / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            argv, env=env, cwd=workdir, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
        )
        try:
            wait_until(probe, process, log)
            yield process
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def gunicorn(name: str, app: str, port: int, workers: int, env: dict[str, str], workdir: Path) -> Any:
    argv = [
        str(BIN / "gunicorn"),
        "--workers", str(workers),
        "--worker-class", "sync",
        "--bind", f"127.0.0.1:{port}",
        "--pythonpath", str(HERE),
        "--timeout", "60",
        app,
    ]  # fmt: skip
    return started(name, argv, env, f"http://127.0.0.1:{port}/healthz", workdir)


def sekmet(port: int, workdir: Path) -> Any:
    """The local FHIR server, started as tests/fhir_server.py starts it (order simulator off)."""
    base = f"http://127.0.0.1:{port}/fhir"
    config = workdir / "sekmet.yaml"
    config.write_text(json.dumps({"simulator": {"enabled": False}, "log_inbound": False}))  # JSON is YAML
    env = {**os.environ, "SEKMET_BASE_URL": base, "SEKMET_DB": str(workdir / "sekmet.db")}
    argv = [str(BIN / "sekmet"), "serve", "-c", str(config), "--host", "127.0.0.1", "--port", str(port)]
    return started("sekmet", argv, env, f"{base}/metadata", workdir)


def worker_memory(master: int) -> list[dict[str, float]]:
    """RSS and USS (private memory) in MiB of each gunicorn worker of ``master``."""
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    found = []
    for pid in children:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
        fields = {line.split(":")[0]: int(line.split()[1]) for line in rollup[1:] if line.endswith("kB")}
        private = fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
        found.append({"rss_mib": round(fields["Rss"] / 1024, 1), "uss_mib": round(private / 1024, 1)})
    return found


@dataclass
class Load:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    worker_cpu_us: float  # CPU time (user + system) of the app's workers per request, under this load


def worker_cpu_seconds(master: int) -> float:
    """User + system CPU seconds so far of the gunicorn workers of ``master`` (all their threads)."""
    ticks = 0
    for pid in Path(f"/proc/{master}/task/{master}/children").read_text().split():
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of proc(5)
    return ticks / os.sysconf("SC_CLK_TCK")


def drive(
    port: int,
    body: Path,
    path: str,
    seconds: float,
    connections: int,
    master: int,
    tokens: Path | None = None,
) -> Load:
    """wrk against one app; with ``tokens`` (a file of JWTs, one a line) each request carries the next one."""
    env = {**os.environ, "BODY_FILE": str(body), "URL_PATH": path}
    if tokens is not None:
        env["TOKENS_FILE"] = str(tokens)
    argv = [
        "wrk", "-t1", f"-c{connections}", f"-d{round(seconds)}s", "--timeout", "10s",
        "-H", f"X-D3K2-Today: {TODAY}", "-s", str(LUA), f"http://127.0.0.1:{port}",
    ]  # fmt: skip
    cpu_before = worker_cpu_seconds(master)
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=True)
    cpu = worker_cpu_seconds(master) - cpu_before
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("BENCH ")), None)
    if line is None:
        sys.exit(f"bench: wrk printed no result:\n{done.stdout}\n{done.stderr}")
    got = json.loads(line.removeprefix("BENCH "))
    errors = got["socket_errors"] + got["status_errors"]  # wrk's count of answers ≥ 400
    return Load(
        rps=round(got["requests"] / (got["duration_us"] / 1e6), 1),
        p50_ms=round(got["p50_us"] / 1000, 2),
        p99_ms=round(got["p99_us"] / 1000, 2),
        requests=got["requests"],
        errors=errors,
        worker_cpu_us=round(cpu / max(got["requests"], 1) * 1e6, 1),
    )


def check_answer(port: int, body: Path, path: str, token: str = "") -> dict[str, Any]:
    """One request outside the load: it must answer 200 (a benchmark of error answers measures nothing)."""
    headers = {"Content-Type": "application/json", "X-D3K2-Today": TODAY}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    answer = requests.post(
        f"http://127.0.0.1:{port}{path}", data=body.read_bytes(), headers=headers, timeout=30
    )
    if answer.status_code != 200:
        sys.exit(f"bench: {path} answered {answer.status_code}: {answer.text[:500]}")
    result: dict[str, Any] = answer.json()
    return result


def fhir_queries(fhir_base: str) -> dict[str, str]:
    """The queries d3k2 sends for a patient-view without prefetch (templates filled as d3k2 fills them)."""
    from d3k2.config import default_cards_dir
    from d3k2.core.hooks import parse_request
    from d3k2.core.loader import load_ruleset
    from d3k2.fhir.prefetch import fill_template

    service = load_ruleset(default_cards_dir()).services[SERVICE["fallback"]]
    request = parse_request(scenarios.fallback(fhir_base))
    filled = {key: fill_template(spec.query, request) for key, spec in service.prefetch.items()}
    return {key: query for key, query in filled.items() if query is not None}


def prefetched_equivalent(fhir_base: str, queries: dict[str, str]) -> dict[str, Any]:
    """The fallback request with what the FHIR server answers given as prefetch: the no-fetch baseline."""
    from d3k2.fhir.client import build_url

    body = scenarios.fallback(fhir_base)
    with requests.Session() as session:
        body["prefetch"] = {
            key: session.get(build_url(fhir_base, q), headers={"Accept": "application/fhir+json"}).json()
            for key, q in queries.items()
        }
    return body


def fallback_in_process(fhir_base: str, queries: dict[str, str], rounds: int) -> dict[str, Any]:
    """FhirClient.fetch_many of every key at once vs each query alone (median wall times, ms)."""
    from d3k2.config import Settings
    from d3k2.fhir.client import FhirClient, build_url

    def median_ms(action: Any) -> float:
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            action()
            times.append((time.perf_counter() - start) * 1000)
        return round(statistics.median(times), 2)

    single: dict[str, float] = {}
    with FhirClient(Settings()) as client, requests.Session() as session:
        headers = {"Accept": "application/fhir+json"}
        for key, query in queries.items():
            url = build_url(fhir_base, query)
            session.get(url, headers=headers).raise_for_status()
            single[key] = median_ms(lambda url=url: session.get(url, headers=headers).content)
        client.fetch_many(fhir_base, queries, None)  # connections opened, as in a running worker
        outcomes = client.fetch_many(fhir_base, queries, None)
        failed = {k: o.error for k, o in outcomes.items() if o.error}
        if failed:
            sys.exit(f"bench: fallback fetches failed: {failed}")
        parallel = median_ms(lambda: client.fetch_many(fhir_base, queries, None))
        # Each query alone through the same client (its reading, parsing and merging included).
        alone = {
            key: median_ms(lambda key=key, q=q: client.fetch_many(fhir_base, {key: q}, None))
            for key, q in queries.items()
        }
    slowest = max(single.values())
    return {
        "queries": len(queries),
        "single_ms": single,
        "slowest_single_ms": slowest,
        "sum_single_ms": round(sum(single.values()), 2),
        "fetch_many_ms": parallel,
        "ratio_to_slowest": round(parallel / slowest, 2),
        "client_single_ms": alone,
        "ratio_to_client_slowest": round(parallel / max(alone.values()), 2),
    }


class _ReplayHandler(BaseHTTPRequestHandler):
    """Answers each GET with the body sekmet gave for that path, after a fixed delay, many at a time."""

    answers: ClassVar[dict[str, bytes]] = {}
    delay_s: ClassVar[float] = 0.01

    def do_GET(self) -> None:
        time.sleep(self.delay_s)
        body = self.answers.get(self.path)
        self.send_response(200 if body is not None else 404)
        self.send_header("Content-Type", "application/fhir+json")
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")

    def log_message(self, *_args: Any) -> None:
        return


def fallback_concurrent(
    fhir_base: str, queries: dict[str, str], delay_ms: float, rounds: int
) -> dict[str, Any]:
    """The same queries against a server that answers concurrently (sekmet's answers replayed, each after
    `delay_ms`, like a FHIR server across a network): does fetch_many cost about one round trip?"""
    from d3k2.fhir.client import build_url

    answers: dict[str, bytes] = {}
    with requests.Session() as session:
        for query in queries.values():
            url = build_url(fhir_base, query)
            answers[urlsplit(url)._replace(scheme="", netloc="").geturl()] = session.get(
                url, headers={"Accept": "application/fhir+json"}
            ).content
    # In a process of its own: its threads must not take the GIL from the client being measured.
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    server = context.Process(target=_serve_replay, args=(answers, delay_ms / 1000, send), daemon=True)
    server.start()
    try:
        if not receive.poll(30):
            sys.exit("bench: the replay server did not start")
        base = f"http://127.0.0.1:{receive.recv()}{urlsplit(fhir_base).path}"
        result = fallback_in_process(base, queries, rounds)
    finally:
        server.terminate()
        server.join(5)
    return {"delay_ms": delay_ms, **result}


def _serve_replay(answers: dict[str, bytes], delay_s: float, port_to: Any) -> None:
    handler = type("Replay", (_ReplayHandler,), {"answers": answers, "delay_s": delay_s})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    port_to.send(server.server_address[1])
    server.serve_forever()


def ratio(a: float, b: float) -> float:
    return round(a / b, 2) if b else float("nan")


def machine() -> dict[str, Any]:
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
         if ln.startswith("model name")),
        platform.processor(),
    )  # fmt: skip
    mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "wrk": (wrk.stdout or wrk.stderr).split("\n")[0].strip(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--seconds", type=float, default=5.0, help="per scenario and app (history: ×2)")
    parser.add_argument("--connections", type=int, default=4, help="for the typical and order-sign scenarios")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--only",
        type=lambda raw: [name.strip() for name in raw.split(",") if name.strip()],
        default=list(SCENARIOS),
        help=f"comma-separated scenarios to run (default all: {','.join(SCENARIOS)})",
    )
    args = parser.parse_args()
    unknown = set(args.only) - set(SCENARIOS)
    if unknown:
        sys.exit(f"bench: unknown scenarios {sorted(unknown)}; choose among {', '.join(SCENARIOS)}")
    if shutil.which("wrk") is None:
        sys.exit("bench: wrk is not installed (Debian: apt-get install wrk; `make bench` does it as root)")

    results: dict[str, Any] = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "workers": args.workers,
        "worker_class": "sync",
        "scenarios": {},
    }
    with tempfile.TemporaryDirectory(prefix="d3k2-bench-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        ports = [free_port() for _ in range(6)]
        fhir_port, bare_port, bare_json_port, d3k2_port, edge_port, auth_port = ports
        fhir_base = f"http://127.0.0.1:{fhir_port}/fhir"
        print(f"bench: starting sekmet, bare (orjson, json) and d3k2 with {args.workers} sync workers each")
        stack.enter_context(sekmet(fhir_port, work))
        requests.post(
            fhir_base,
            json=scenarios.load_bundle(),
            headers={"Content-Type": "application/fhir+json"},
            timeout=30,
        ).raise_for_status()
        bodies = scenarios.write_all(work / "bodies", fhir_base)
        queries = fhir_queries(fhir_base)
        bodies["history-prefetched"] = bodies["history"]
        fallback_base = work / "bodies" / "fallback-prefetched.json"
        fallback_base.write_text(json.dumps(prefetched_equivalent(fhir_base, queries), separators=(",", ":")))

        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
        bare = stack.enter_context(
            gunicorn("bare", "bare_app:create_app()", bare_port, args.workers, env, work)
        )
        bare_json = stack.enter_context(
            gunicorn(
                "bare-json", "bare_app:create_app()", bare_json_port, args.workers,
                {**env, "BARE_PARSER": "json"}, work,
            )
        )  # fmt: skip
        d3k2_env = {
            **env,
            "D3K2_ENV": "dev",  # X-D3K2-Today fixes the day, as in the fixtures
            "D3K2_AUTH": "off",
            "D3K2_DATA_DIR": str(work / "d3k2-data"),
            # The history scenario is ≈ 7 MB; the default limit (5 MiB) would answer 413.
            "D3K2_MAX_BODY_BYTES": str(32 * 1024 * 1024),
            "D3K2_FHIR_ALLOWED": "http://127.0.0.1:*",
        }
        (work / "d3k2-data").mkdir()
        d3k2 = stack.enter_context(
            gunicorn("d3k2", "d3k2.http.wsgi:app", d3k2_port, args.workers, d3k2_env, work)
        )
        (work / "edge-data").mkdir()
        edge_env = {**d3k2_env, "D3K2_DATA_DIR": str(work / "edge-data")}
        edge = stack.enter_context(
            gunicorn("d3k2-edge", "edge_app:app", edge_port, args.workers, edge_env, work)
        )
        issuer = auth.Issuer(work)
        if "auth" in args.only:
            (work / "auth-data").mkdir()
            auth_env = {**d3k2_env, "D3K2_DATA_DIR": str(work / "auth-data"), **issuer.env()}
            d3k2_auth = stack.enter_context(
                gunicorn("d3k2-auth", "d3k2.http.wsgi:app", auth_port, args.workers, auth_env, work)
            )

        plan = [
            ("typical", bodies["typical"], args.connections, args.seconds),
            ("order-sign", bodies["order-sign"], args.connections, args.seconds),
            ("history", bodies["history"], 1, args.seconds * 2),
            ("fallback", bodies["fallback"], 1, args.seconds),
        ]
        for name, body, connections, seconds in plan:
            if name not in args.only:
                continue
            path = f"/cds-services/{SERVICE[name]}"
            answer = check_answer(d3k2_port, body, path)
            check_answer(bare_port, body, path)
            for _ in range(3):  # warm both apps' workers on this body
                check_answer(d3k2_port, body, path)
                check_answer(bare_port, body, path)
            row: dict[str, Any] = {
                "body_bytes": body.stat().st_size,
                "connections": connections,
                "seconds": seconds,
                "d3k2_cards": [c["summary"] for c in answer["cards"]],
            }
            print(f"bench: {name} ({row['body_bytes']:,} B, {connections} connections, {seconds:g} s each)")
            row["bare"] = asdict(drive(bare_port, body, path, seconds, connections, bare.pid))
            if name == "history":
                row["bare_json"] = asdict(
                    drive(bare_json_port, body, path, seconds, connections, bare_json.pid)
                )
            row["d3k2"] = asdict(drive(d3k2_port, body, path, seconds, connections, d3k2.pid))
            if name in ("typical", "order-sign"):
                for _ in range(3):
                    check_answer(edge_port, body, path)
                row["d3k2_edge_only"] = asdict(drive(edge_port, body, path, seconds, connections, edge.pid))
            if name == "fallback":
                check_answer(d3k2_port, fallback_base, path)
                row["d3k2_same_data_prefetched"] = asdict(
                    drive(d3k2_port, fallback_base, path, seconds, connections, d3k2.pid)
                )
            results["scenarios"][name] = row
        if "auth" in args.only:
            results["auth"] = auth_on_off(
                issuer, bodies["typical"], (d3k2_port, d3k2.pid), (auth_port, d3k2_auth.pid), args
            )
        if "fallback" in args.only:
            print("bench: fallback in-process (FhirClient.fetch_many vs each query alone)")
            results["fallback_in_process"] = fallback_in_process(fhir_base, queries, rounds=30)
            print("bench: fallback against a concurrent server (sekmet's answers replayed, 10 ms each)")
            results["fallback_concurrent"] = fallback_concurrent(fhir_base, queries, delay_ms=10, rounds=30)
        results["memory"] = {"bare": worker_memory(bare.pid), "d3k2": worker_memory(d3k2.pid)}
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"bench: results written to {args.json}")


def auth_on_off(
    issuer: auth.Issuer, body: Path, off: tuple[int, int], on: tuple[int, int], args: argparse.Namespace
) -> dict[str, Any]:
    """The typical call against d3k2 with auth off, then against the same d3k2 (same gunicorn settings) with
    D3K2_AUTH=required, each request with a fresh token from a pool minted beforehand."""
    path = f"/cds-services/{SERVICE['typical']}"
    for token in issuer.pool("warm", 4, path).read_text().split():  # each must answer 200: accepted
        check_answer(off[0], body, path)
        check_answer(on[0], body, path, token)
    # Auth off ignores the header: any tokens will do, reused; wrk does the same work as in the auth-on run.
    ignored = issuer.pool("ignored", 1000, path)
    print(f"bench: auth (typical, {args.connections} connections, {args.seconds:g} s each): off, then on")
    load_off = drive(off[0], body, path, args.seconds, args.connections, off[1], ignored)
    count = auth.pool_size(load_off.rps, args.seconds, args.connections)
    started = time.monotonic()
    fresh = issuer.pool("fresh", count, path)
    minted_s = round(time.monotonic() - started, 1)
    load_on = drive(on[0], body, path, args.seconds, args.connections, on[1], fresh)
    if load_on.requests + args.connections >= count:
        sys.exit(f"bench: the pool of {count} tokens ran out after {load_on.requests} requests (reused)")
    return {
        "tokens": count,
        "minting_s": minted_s,
        "connections": args.connections,
        "seconds": args.seconds,
        "auth_off": asdict(load_off),
        "auth_on": asdict(load_on),
        "ratio": ratio(load_on.rps, load_off.rps),
    }


def report(results: dict[str, Any]) -> None:
    m = results["machine"]
    print()
    print(f"machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, Python {m['python']}, {m['wrk']}")
    print(f"gunicorn: {results['workers']} {results['worker_class']} workers per app; wrk -t1")
    print()
    head = (
        f"{'scenario':<12} {'app':<18} {'conc':>4} {'req/s':>9} {'p50 ms':>9} {'p99 ms':>9} {'err':>4}"
        f" {'cpu µs':>8}"
    )
    print(head)
    print("-" * len(head))
    s = results["scenarios"]
    for name, row in s.items():
        apps = [("bare (orjson)", row["bare"])]
        if "bare_json" in row:
            apps.append(("bare (std json)", row["bare_json"]))
        apps.append(("d3k2", row["d3k2"]))
        if "d3k2_edge_only" in row:
            apps.append(("d3k2, core memo", row["d3k2_edge_only"]))
        if "d3k2_same_data_prefetched" in row:
            apps.append(("d3k2, prefetched", row["d3k2_same_data_prefetched"]))
        for app, load in apps:
            print(
                f"{name:<12} {app:<18} {row['connections']:>4} {load['rps']:>9,.1f} "
                f"{load['p50_ms']:>9.2f} {load['p99_ms']:>9.2f} {load['errors']:>4}"
                f" {load['worker_cpu_us']:>8,.0f}"
            )
        d, b = row["d3k2"], row["bare"]
        print(
            f"{'':<12} {'d3k2 / bare':<18} {'':>4} {ratio(d['rps'], b['rps']):>9.2f} "
            f"{ratio(d['p50_ms'], b['p50_ms']):>9.2f} {ratio(d['p99_ms'], b['p99_ms']):>9.2f}"
            f" {'':>4} {ratio(d['worker_cpu_us'], b['worker_cpu_us']):>8.2f}"
        )
    if "auth" in results:
        row = results["auth"]
        for app, key in (("d3k2, auth off", "auth_off"), ("d3k2, auth on", "auth_on")):
            load = row[key]
            print(
                f"{'auth':<12} {app:<18} {row['connections']:>4} {load['rps']:>9,.1f} "
                f"{load['p50_ms']:>9.2f} {load['p99_ms']:>9.2f} {load['errors']:>4}"
                f" {load['worker_cpu_us']:>8,.0f}"
            )
    print()
    print("targets")
    if "typical" in s:
        typical = s["typical"]
        share = ratio(typical["d3k2"]["rps"], typical["bare"]["rps"])
        print(
            f"  typical: d3k2 at {share:.0%} of the bare throughput (target ≥ 60 %), "
            f"p99 {typical['d3k2']['p99_ms']:.2f} ms (target < 10 ms)"
        )
    if "auth" in results:
        print(auth.report_line(results["auth"]))
    for name in ("typical", "order-sign"):
        row = s.get(name, {})
        if "d3k2_edge_only" not in row:
            continue
        # Worker time per request (workers ÷ throughput): what the edge and the core add to the bare app.
        per = {k: results["workers"] / row[k]["rps"] * 1e6 for k in ("bare", "d3k2_edge_only", "d3k2")}
        edge, core = per["d3k2_edge_only"] - per["bare"], per["d3k2"] - per["d3k2_edge_only"]
        cpu = {k: row[k]["worker_cpu_us"] for k in ("bare", "d3k2_edge_only", "d3k2")}
        print(
            f"  {name}: worker time per request {per['d3k2']:.0f} µs = bare {per['bare']:.0f} "
            f"+ edge {edge:.0f} + core {core:.0f}; worker CPU per request {cpu['d3k2']:.0f} µs = "
            f"bare {cpu['bare']:.0f} + edge {cpu['d3k2_edge_only'] - cpu['bare']:.0f} "
            f"+ core {cpu['d3k2'] - cpu['d3k2_edge_only']:.0f}; "
            f"with the core memoised d3k2 reaches "
            f"{ratio(row['d3k2_edge_only']['rps'], row['bare']['rps']):.0%} of bare"
        )
    if "history" in s:
        report_history(s["history"])
    if "fallback" in s:
        report_fallback(s["fallback"], results["fallback_in_process"], results["fallback_concurrent"])
    mem = {
        app: ", ".join(f"{w['rss_mib']}/{w['uss_mib']}" for w in workers)
        for app, workers in results["memory"].items()
    }
    print(f"  memory per worker after the run (RSS/USS MiB): d3k2 {mem['d3k2']}; bare {mem['bare']}")


def report_history(history: dict[str, Any]) -> None:
    print(
        f"  history: d3k2 p50 {history['d3k2']['p50_ms']:.1f} ms = "
        f"{ratio(history['d3k2']['p50_ms'], history['bare_json']['p50_ms']):.2f} × bare with std json "
        f"({history['bare_json']['p50_ms']:.1f} ms; target ≤ 1.2 ×), "
        f"{ratio(history['d3k2']['p50_ms'], history['bare']['p50_ms']):.2f} × bare with orjson "
        f"({history['bare']['p50_ms']:.1f} ms)"
    )


def report_fallback(e2e: dict[str, Any], fb: dict[str, Any], fc: dict[str, Any]) -> None:
    fetch_cost = round(e2e["d3k2"]["p50_ms"] - e2e["d3k2_same_data_prefetched"]["p50_ms"], 2)
    print(
        f"  fallback ({fb['queries']} queries): fetch_many {fb['fetch_many_ms']:.2f} ms vs slowest single "
        f"{fb['slowest_single_ms']:.2f} ms = {fb['ratio_to_slowest']:.2f} × (target ≤ 1.5 ×; sum of singles "
        f"{fb['sum_single_ms']:.2f} ms); end to end: p50 with fetching − p50 prefetched = {fetch_cost:.2f} ms"
        f" = {ratio(fetch_cost, fb['slowest_single_ms']):.2f} × slowest single"
    )
    print(
        f"  fallback against a concurrent server ({fc['delay_ms']:.0f} ms per answer): fetch_many "
        f"{fc['fetch_many_ms']:.2f} ms vs slowest single {fc['slowest_single_ms']:.2f} ms = "
        f"{fc['ratio_to_slowest']:.2f} × (target ≤ 1.5 ×; sum of singles {fc['sum_single_ms']:.2f} ms); "
        f"slowest query alone through FhirClient {max(fc['client_single_ms'].values()):.2f} ms = "
        f"{fc['ratio_to_client_slowest']:.2f} ×"
    )


if __name__ == "__main__":
    main()
