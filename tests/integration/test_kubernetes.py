"""docker/kubernetes/: every manifest valid against the Kubernetes JSON schemas (kubernetes-validate, which
bundles them: offline), strict (an unknown field is an error), for the oldest and the newest Kubernetes
version we state; and d3k2's own invariants: probes on the service's health endpoints, a non-root read-only
container with resources, the image docker/Dockerfile builds, only settings d3k2 reads, selectors that match,
the trust file where D3K2_TRUST_FILE says and readable by d3k2, the migration command that exists.

Each check is also run on mutated copies, where it must fail.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from builders import REPO
from d3k2.config import from_env
from d3k2.http.auth import load_trust
from d3k2.tools.cli import main as cli

KUBERNETES = REPO / "docker" / "kubernetes"
VERSIONS = ("1.30.0", "1.37.0")  # the oldest Kubernetes d3k2's manifests are for, and the newest bundled
# Where d3k2 reads its settings: the app (d3k2.config) and gunicorn's configuration.
SETTINGS_SOURCES = (REPO / "service" / "d3k2" / "config.py", REPO / "docker" / "gunicorn.conf.py")
HEALTH = {"livenessProbe": "/healthz", "readinessProbe": "/readyz", "startupProbe": "/healthz"}

Docs = list[dict[str, Any]]


def manifests() -> Docs:
    docs: Docs = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def one(docs: Docs, kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{kind} {name or ''}: {len(found)} found"
    return found[0]


def image_built() -> str:
    """The image name docker/Dockerfile's build line gives (`docker build ... -t NAME .`), with its tag."""
    match = re.search(
        r"docker build -f docker/Dockerfile -t (\S+) \.", (REPO / "docker" / "Dockerfile").read_text()
    )
    assert match, "docker/Dockerfile names no build command"
    name = match.group(1)
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def dockerfile_uid() -> int:
    match = re.search(r"useradd [^\n]*--uid (\d+)", (REPO / "docker" / "Dockerfile").read_text())
    assert match
    return int(match.group(1))


def settings_read() -> set[str]:
    return {
        name
        for source in SETTINGS_SOURCES
        for name in re.findall(r"[\"']([A-Z][A-Z0-9_]+)[\"']", source.read_text())
    }


def pods(docs: Docs) -> Iterator[tuple[str, dict[str, Any]]]:
    for doc in docs:
        if doc["kind"] in ("Deployment", "Job"):
            yield f"{doc['kind']} {doc['metadata']['name']}", doc["spec"]["template"]


# ---------------------------------------------------------------- the invariants, each a list of problems


def schema_problems(docs: Docs, version: str) -> list[str]:
    problems = []
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            problems.append(f"{doc['kind']} {doc['metadata']['name']}: {error.message}")
    return problems


def security_problems(docs: Docs) -> list[str]:
    problems = []
    for where, template in pods(docs):
        pod = template["spec"].get("securityContext", {})
        if pod.get("runAsNonRoot") is not True or pod.get("runAsUser") != dockerfile_uid():
            problems.append(f"{where}: runAsNonRoot and the image's uid {dockerfile_uid()} required")
        for container in template["spec"]["containers"]:
            context = container.get("securityContext", {})
            if context.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{where}: {container['name']} root file system not read-only")
            if context.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: {container['name']} may escalate privileges")
            if context.get("capabilities", {}).get("drop") != ["ALL"]:
                problems.append(f"{where}: {container['name']} keeps capabilities")
            resources = container.get("resources", {})
            for needed in ("requests.cpu", "requests.memory", "limits.memory"):
                part, kind = needed.split(".")
                if kind not in resources.get(part, {}):
                    problems.append(f"{where}: {container['name']} without resources.{needed}")
            if container.get("image") != image_built():
                problems.append(f"{where}: image {container.get('image')!r} is not {image_built()!r}")
    return problems


def probe_problems(docs: Docs) -> list[str]:
    problems = []
    container = one(docs, "Deployment", "d3k2")["spec"]["template"]["spec"]["containers"][0]
    ports = {port.get("name") for port in container.get("ports", [])} | {
        port["containerPort"] for port in container.get("ports", [])
    }
    for probe, path in HEALTH.items():
        get = container.get(probe, {}).get("httpGet", {})
        if get.get("path") != path or get.get("port") not in ports:
            problems.append(f"{probe}: must GET {path} on a port of the container")
    return problems


def env_problems(docs: Docs) -> list[str]:
    known = settings_read()
    problems = []
    configmaps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    for where, template in pods(docs):
        for container in template["spec"]["containers"]:
            names = [variable["name"] for variable in container.get("env", [])]
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    names += list(configmaps[source["configMapRef"]["name"]]["data"])
                else:
                    names += list(secrets[source["secretRef"]["name"]]["stringData"])
            problems += [f"{where}: {name} is read by no d3k2 code" for name in names if name not in known]
    return problems


def wiring_problems(docs: Docs) -> list[str]:
    """Selectors, the trust file's mount, the migration command."""
    problems = []
    deployment = one(docs, "Deployment", "d3k2")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    matches = {
        "Service": one(docs, "Service", "d3k2")["spec"]["selector"],
        "PodDisruptionBudget": one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
        "Deployment": deployment["spec"]["selector"]["matchLabels"],
    }
    for kind, selector in matches.items():
        if not selector.items() <= labels.items():
            problems.append(f"{kind} selects {selector}, not the pods")
    target = one(docs, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    if (target["kind"], target["name"]) != ("Deployment", "d3k2"):
        problems.append(f"HorizontalPodAutoscaler scales {target}")
    trust_file = Path(one(docs, "ConfigMap", "d3k2-config")["data"]["D3K2_TRUST_FILE"])
    spec = deployment["spec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
    trusted = [
        v for v in spec["volumes"] if mounts.get(v["name"]) == str(trust_file.parent) and "configMap" in v
    ]
    if not trusted or trust_file.name not in one(docs, "ConfigMap", trusted[0]["configMap"]["name"])["data"]:
        problems.append(
            f"D3K2_TRUST_FILE {trust_file} is not a key of a ConfigMap mounted at {trust_file.parent}"
        )
    command = one(docs, "Job")["spec"]["template"]["spec"]["containers"][0]["command"]
    group = cli.commands.get(command[1]) if command[0] == "d3k2" and len(command) == 3 else None
    if group is None or command[2] not in getattr(group, "commands", {}):
        problems.append(f"the migration Job runs {command}, not a d3k2 command")
    return problems


CHECKS: dict[str, Callable[[Docs], list[str]]] = {
    "security": security_problems,
    "probes": probe_problems,
    "env": env_problems,
    "wiring": wiring_problems,
}


# ---------------------------------------------------------------- the manifests as shipped


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_is_valid_for_kubernetes(version: str) -> None:
    docs = manifests()
    kinds = {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap", "Secret"}
    assert {d["kind"] for d in docs} >= kinds | {"Job"}
    assert schema_problems(docs, version) == []


@pytest.mark.parametrize("check", CHECKS)
def test_the_manifests_keep_the_invariants(check: str) -> None:
    assert CHECKS[check](manifests()) == []


def test_kustomization_lists_every_manifest_but_the_secret_template() -> None:
    """`kubectl apply -k` must never overwrite the real database secret with the template."""
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml", "secret.yaml"}


def test_the_trust_file_is_one_d3k2_reads(tmp_path: Path) -> None:
    trust = tmp_path / "trust.toml"
    trust.write_text(one(manifests(), "ConfigMap", "d3k2-trust")["data"]["trust.toml"])
    assert load_trust(trust)


def test_the_settings_are_ones_d3k2_starts_with() -> None:
    docs = manifests()
    env = {**one(docs, "ConfigMap", "d3k2-config")["data"], **one(docs, "Secret")["stringData"]}
    for variable in deployment_container(docs)["env"]:
        env[variable["name"]] = variable["value"]
    settings = from_env(env)
    assert (settings.env, settings.auth_mode, settings.fhir_allowed) == ("production", "required", ())
    assert settings.database.startswith("postgresql://")


def test_the_secret_is_a_template() -> None:
    secret = one(manifests(), "Secret", "d3k2-database")
    assert all("CHANGE-ME" in value for value in secret["stringData"].values())


# ---------------------------------------------------------------- the checks fail on broken manifests


def deployment_container(docs: Docs) -> dict[str, Any]:
    container: dict[str, Any] = one(docs, "Deployment", "d3k2")["spec"]["template"]["spec"]["containers"][0]
    return container


SCHEMA_BREAKS: dict[str, Callable[[Docs], None]] = {
    "unknown field": lambda docs: one(docs, "Deployment")["spec"].update(replica=2),
    "wrong type": lambda docs: one(docs, "Deployment")["spec"].update(replicas="two"),
    "required field missing": lambda docs: deployment_container(docs).pop("name"),
    "unknown probe action": lambda docs: deployment_container(docs)["livenessProbe"].update(httpGett={}),
    "a number as a list": lambda docs: one(docs, "PodDisruptionBudget")["spec"].update(minAvailable=[1]),
}

INVARIANT_BREAKS: dict[str, tuple[str, Callable[[Docs], None]]] = {
    "no readiness probe": ("probes", lambda docs: deployment_container(docs).pop("readinessProbe")),
    "liveness on readyz": (
        "probes",
        lambda docs: deployment_container(docs)["livenessProbe"]["httpGet"].update(path="/readyz"),
    ),
    "root allowed": (
        "security",
        lambda docs: one(docs, "Job")["spec"]["template"]["spec"]["securityContext"].pop("runAsNonRoot"),
    ),
    "writable root": (
        "security",
        lambda docs: deployment_container(docs)["securityContext"].update(readOnlyRootFilesystem=False),
    ),
    "no memory limit": (
        "security",
        lambda docs: deployment_container(docs)["resources"]["limits"].pop("memory"),
    ),
    "other image": ("security", lambda docs: deployment_container(docs).update(image="d3k2:0.0.1")),
    "unknown setting": (
        "env",
        lambda docs: one(docs, "ConfigMap", "d3k2-config")["data"].update(D3K2_WORKERS="4"),
    ),
    "misspelt env": (
        "env",
        lambda docs: deployment_container(docs)["env"].append({"name": "D3K2_DATADIR", "value": "/x"}),
    ),
    "service selects nothing": (
        "wiring",
        lambda docs: one(docs, "Service")["spec"]["selector"].update(app="other"),
    ),
    "trust not mounted": ("wiring", lambda docs: deployment_container(docs)["volumeMounts"].pop()),
    "no such command": (
        "wiring",
        lambda docs: one(docs, "Job")["spec"]["template"]["spec"]["containers"][0].update(
            command=["d3k2", "feedback", "upgrade"]
        ),
    ),
}


@pytest.mark.parametrize("name", SCHEMA_BREAKS)
def test_the_schema_check_fails_on_a_broken_manifest(name: str) -> None:
    docs = copy.deepcopy(manifests())
    SCHEMA_BREAKS[name](docs)
    assert schema_problems(docs, VERSIONS[-1])


@pytest.mark.parametrize("name", INVARIANT_BREAKS)
def test_each_invariant_check_fails_on_a_broken_manifest(name: str) -> None:
    check, breaks = INVARIANT_BREAKS[name]
    docs = copy.deepcopy(manifests())
    breaks(docs)
    assert CHECKS[check](docs)
