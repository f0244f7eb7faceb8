"""What each part of a typical answer costs under load: d3k2 with that part left out
(``leave_out_app.py``) against d3k2 whole, same gunicorn (2 sync workers), same wrk load as ``make bench``.

For each round and part it starts the app, checks one answer, drives it with wrk and reads the workers'
CPU time from /proc; it prints, per part, the mean throughput, the mean worker CPU per request and how
much less that is than with nothing left out. Runs are interleaved round by round, so that a drift of the
machine spreads over every part. About 12 s per part and round:

    cd bench && ../.venv/bin/python leave_out.py --rounds 2 --seconds 8
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from contextlib import ExitStack
from pathlib import Path

import run
import scenarios

PARTS = ("none", "facts", "rules", "cards", "model", "depth", "record", "log", "ids", "metrics")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("parts", nargs="*", default=list(PARTS), help=f"any of: {' '.join(PARTS)}")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")
    parts = ["none", *[p for p in args.parts if p != "none"]]
    path = f"/cds-services/{run.SERVICE['typical']}"
    found: dict[str, list[run.Load]] = {part: [] for part in parts}
    with tempfile.TemporaryDirectory(prefix="d3k2-leave-out-") as tmp:
        work = Path(tmp)
        body = work / "typical.json"
        body.write_bytes(run.json.dumps(scenarios.typical(), separators=(",", ":")).encode())
        for round_ in range(args.rounds):
            for part in parts:
                data = work / f"data-{part}-{round_}"
                data.mkdir()
                env = {
                    **run.os.environ,
                    "PYTHONDONTWRITEBYTECODE": "1",
                    "D3K2_ENV": "dev",
                    "D3K2_AUTH": "off",
                    "D3K2_DATA_DIR": str(data),
                    "D3K2_LEAVE_OUT": part,
                }
                port = run.free_port()
                with ExitStack() as stack:
                    app = stack.enter_context(
                        run.gunicorn(f"leave-out-{part}", "leave_out_app:app", port, args.workers, env, work)
                    )
                    for _ in range(5):
                        run.check_answer(port, body, path)
                    load = run.drive(port, body, path, args.seconds, args.connections, app.pid)
                found[part].append(load)
                print(
                    f"leave-out: round {round_ + 1}, {part}: {load.rps:,.0f} req/s, "
                    f"{load.worker_cpu_us:.0f} µs of worker CPU per request"
                )
    base = statistics.mean(load.worker_cpu_us for load in found["none"])
    print()
    print("worker CPU per request, mean of the rounds")
    print(f"{'left out':<10} {'req/s':>9} {'cpu µs':>8} {'saved µs':>9}")
    for part in parts:
        cpu = statistics.mean(load.worker_cpu_us for load in found[part])
        rps = statistics.mean(load.rps for load in found[part])
        print(f"{part:<10} {rps:>9,.0f} {cpu:>8.0f} {base - cpu:>9.0f}")


if __name__ == "__main__":
    main()
