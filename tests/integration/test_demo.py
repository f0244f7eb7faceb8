"""`make demo` (tools/demo.py): the launcher on free ports, each demo patient's patient-view fetched by d3k2
from the demo FHIR server (no prefetch), the sandbox URLs it prints, and Ctrl-C stopping both servers."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from builders import REPO, TODAY
from fhir_server import free_port

STARTUP_SECONDS = 120.0  # two servers on a busy 2-core machine


def demo_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("demo", REPO / "tools" / "demo.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class Demo:
    process: subprocess.Popen[bytes]
    port: int
    fhir_port: int
    stdout: Path
    stderr: Path

    @property
    def discovery(self) -> str:
        return f"http://127.0.0.1:{self.port}/cds-services"

    @property
    def fhir(self) -> str:
        return f"http://127.0.0.1:{self.fhir_port}/fhir"

    def printed(self) -> str:
        return self.stdout.read_text(errors="replace")


def _wait_for_banner(demo: Demo) -> None:
    end = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < end and demo.process.poll() is None:
        if "Press Ctrl-C" in demo.printed():
            return
        time.sleep(0.2)
    pytest.fail(
        f"the demo did not start (exit {demo.process.poll()});\nstdout:\n{demo.printed()}\n"
        f"stderr:\n{demo.stderr.read_text(errors='replace')[-4000:]}"
    )


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    workdir = tmp_path_factory.mktemp("demo")
    port, fhir_port = free_port(), free_port()
    env = {name: value for name, value in os.environ.items() if not name.startswith("D3K2_")}
    # TMPDIR: the launcher's working directory (tempfile.mkdtemp) under this test's own.
    env.update({"D3K2_DEMO_PORT": str(port), "D3K2_DEMO_FHIR_PORT": str(fhir_port), "TMPDIR": str(workdir)})
    stdout, stderr = workdir / "stdout.log", workdir / "stderr.log"
    with stdout.open("wb") as out, stderr.open("wb") as err:
        process = subprocess.Popen(
            [sys.executable, str(REPO / "tools" / "demo.py"), "--today", TODAY.isoformat()],
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
        )
    running = Demo(process, port, fhir_port, stdout, stderr)
    try:
        _wait_for_banner(running)
        yield running
    finally:
        if process.poll() is None:
            process.kill()  # the stop test failed: nothing more to lose
            process.wait()


def patient_view(demo: Demo, patient_id: str) -> dict[str, Any]:
    body = {
        "hook": "patient-view",
        "hookInstance": str(uuid.uuid4()),
        "fhirServer": demo.fhir,
        "context": {"patientId": patient_id, "userId": "Practitioner/demo"},
    }
    request = urllib.request.Request(
        f"{demo.discovery}/d3k2-patient-view",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "X-D3K2-Today": TODAY.isoformat()},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        answer: dict[str, Any] = json.loads(response.read())
        return answer


def topics(answer: dict[str, Any]) -> list[str]:
    return sorted(card["source"]["topic"]["code"] for card in answer["cards"])


def suggests_k2(answer: dict[str, Any]) -> bool:
    labels = [s["label"] for card in answer["cards"] for s in card.get("suggestions", [])]
    return any("K2" in label for label in labels)


# Each demo patient: the rule whose card must appear, rules that must stay silent, whether K2 may be offered.
EXPECTED = {
    "demo-deficient": ("vitd-deficient", {"kidney-advanced", "vka-k2"}, True),
    "demo-warfarin": ("vitd-deficient", {"k2-with-d3"}, False),
    "demo-ckd4": ("kidney-advanced", {"vitd-deficient", "k2-with-d3"}, False),
    "demo-pregnant": ("pregnancy-vitd-low", {"vitd-deficient", "k2-with-d3"}, False),
    "demo-child": ("vitd-deficient-child", {"vitd-deficient", "k2-with-d3"}, False),
    "demo-very-high": ("vitd-very-high", {"vitd-deficient", "k2-with-d3"}, False),
}


@pytest.mark.parametrize("patient_id", sorted(EXPECTED))
def test_each_demo_patient_gets_its_card_from_data_fetched_from_the_demo_fhir_server(
    demo: Demo, patient_id: str
) -> None:
    fires, silent, k2 = EXPECTED[patient_id]
    answer = patient_view(demo, patient_id)
    assert fires in topics(answer), answer
    assert not silent & set(topics(answer)), answer
    assert suggests_k2(answer) is k2


def test_the_pregnant_patient_is_offered_the_pregnancy_dose_and_the_child_the_child_dose(demo: Demo) -> None:
    pregnant = patient_view(demo, "demo-pregnant")["cards"]
    assert [s["label"] for s in pregnant[0]["suggestions"]][:2] == [
        "Order D3 2,000 IU once daily",
        "Order D3 1,000 IU once daily",
    ]
    child = patient_view(demo, "demo-child")["cards"]
    assert child[0]["suggestions"][0]["label"] == "Order D3 2,000 IU daily for 6 weeks, then retest"


def test_the_demo_lets_d3k2_fetch_from_its_own_fhir_server_only(demo: Demo) -> None:
    other = f"http://127.0.0.1:{free_port()}/fhir"
    body = {
        "hook": "patient-view",
        "hookInstance": str(uuid.uuid4()),
        "fhirServer": other,
        "context": {"patientId": "demo-deficient", "userId": "Practitioner/demo"},
    }
    request = urllib.request.Request(
        f"{demo.discovery}/d3k2-patient-view",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)
    refused.value.close()
    assert refused.value.code == 403


def test_the_printed_sandbox_urls_name_discovery_fhir_server_and_each_patient(demo: Demo) -> None:
    printed = demo.printed()
    assert f"d3k2 discovery:   {demo.discovery}\n" in printed
    assert f"FHIR R4 server:   {demo.fhir}\n" in printed
    urls = [line.strip() for line in printed.splitlines() if line.strip().startswith("https://")]
    patients = []
    for url in urls:
        parts = urlsplit(url)
        assert (parts.scheme, parts.netloc, parts.path, parts.fragment) == (
            "https",
            "sandbox.cds-hooks.org",
            "/",
            "",
        )
        query = parse_qs(parts.query, strict_parsing=True)
        assert set(query) == {"serviceDiscoveryURL", "fhirServiceUrl", "patientId"}
        assert query["serviceDiscoveryURL"] == [demo.discovery]
        assert query["fhirServiceUrl"] == [demo.fhir]
        patients += query["patientId"]
    assert sorted(patients) == sorted(EXPECTED)


def test_dates_are_moved_to_today_and_ages_kept() -> None:
    module = demo_module()
    dated = module.demo_bundles(date(2026, 11, 24))
    moved = module.demo_bundles(date(2027, 1, 3))  # 40 days later
    child = module.the_patient(moved["child"])
    assert module.the_patient(dated["child"])["birthDate"] == "2020-05-18"
    assert child["birthDate"] == "2020-06-27"
    vitd = [e["resource"] for e in moved["deficient"]["entry"] if e["resource"]["id"].endswith("-vitd")]
    assert vitd[0]["effectiveDateTime"] == "2026-12-11"
    assert module.shift_dates({"a": ["2026-11-01T08:30:00Z", "2026", "x"]}, 1) == {
        "a": ["2026-11-02T08:30:00Z", "2026", "x"]
    }


def _refused(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5):
            return False
    except urllib.error.URLError as exc:
        return isinstance(exc.reason, ConnectionRefusedError)


def test_ctrl_c_stops_both_servers_and_the_logs_carry_no_colour_codes(demo: Demo) -> None:
    """Last in this module (pytest keeps file order): it stops the demo the tests above use."""
    demo.process.send_signal(signal.SIGINT)
    assert demo.process.wait(timeout=60) == 0
    assert "demo: stopping" in demo.printed()
    assert _refused(f"{demo.discovery.removesuffix('/cds-services')}/healthz")
    assert _refused(f"{demo.fhir}/metadata")
    logs = demo.stderr.read_text(errors="replace")
    assert "\x1b" not in logs + demo.printed()
    lines = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    assert any(line.get("path") == "/cds-services/d3k2-patient-view" for line in lines)
