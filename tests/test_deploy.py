"""The deployment files agree with Kubernetes' schemas, with Compose, and with the CLI.

Offline and fast: the Kubernetes manifests are checked against the schemas bundled with
kubernetes-validate; every gosgd-node command line in deploy/ and the Dockerfile is parsed by
the real `build_parser()`, so a renamed or removed flag fails here rather than in a cluster.
(`deploy/smoke.sh` builds the image and runs the compose demo for real; it needs root and
Docker, so it is not part of the test suite.)
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from gosgd_p2p.cli import build_parser, configs_from_args

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
K8S_DIR = DEPLOY / "k8s"
#: A recent Kubernetes release whose schemas kubernetes-validate bundles (native gRPC probes
#: are GA since 1.27).
K8S_VERSION = "1.35.0"
GRPC_PORT, METRICS_PORT = 7070, 9100
#: Top-level keys of the Compose Specification (v2 and v1 >= 1.27 both read it).
COMPOSE_TOP_LEVEL = {"name", "services", "networks", "volumes", "configs", "secrets"}


def k8s_documents(text: str | None = None) -> list[dict[str, Any]]:
    """Every manifest under deploy/k8s (or in `text`), in file order."""
    texts = [text] if text is not None else [p.read_text() for p in sorted(K8S_DIR.glob("*.yaml"))]
    return [doc for t in texts for doc in yaml.safe_load_all(t) if doc]


def k8s_kind(kind: str) -> dict[str, Any]:
    (doc,) = [d for d in k8s_documents() if d["kind"] == kind]
    return doc


def node_container(statefulset: dict[str, Any]) -> dict[str, Any]:
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    return container


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def parse_node_args(argv: list[str], where: str) -> Any:
    """Parse like `gosgd-node argv` would; fail naming `where` instead of exiting."""
    try:
        args = build_parser().parse_args(argv)
        configs_from_args(args)
    except SystemExit as err:
        pytest.fail(f"{where}: gosgd-node rejects {shlex.join(argv)} (exit {err.code})")
    except ValueError as err:
        pytest.fail(f"{where}: {err}")
    return args


def dockerfile_json(instruction: str) -> list[str]:
    """The exec-form array of a Dockerfile instruction (continuation lines joined)."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    match = re.search(rf"^{instruction}\s+(?:.*?\s)?(\[.*\])\s*$", text, re.MULTILINE)
    assert match, f"no exec-form {instruction} in the Dockerfile"
    return json.loads(match.group(1))


# --- Kubernetes -----------------------------------------------------------------------------


def test_k8s_manifests_match_the_schemas() -> None:
    docs = k8s_documents()
    assert {d["kind"] for d in docs} == {"StatefulSet", "Service", "Secret"}
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_k8s_validation_catches_a_typo() -> None:
    """The schema check is real: a misspelled field fails it."""
    statefulset = copy.deepcopy(k8s_kind("StatefulSet"))
    node_container(statefulset)["readinesProbe"] = node_container(statefulset).pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(statefulset, K8S_VERSION, strict=True)


def test_k8s_cpu_variant_is_valid_and_gpu_free() -> None:
    """The documented CPU recipe (delete the `nvidia.com/gpu:` lines) leaves a valid manifest."""
    text = (K8S_DIR / "statefulset.yaml").read_text()
    assert "sed '/nvidia.com\\/gpu:/d' deploy/k8s/statefulset.yaml" in text
    cpu_text = "\n".join(line for line in text.splitlines() if "nvidia.com/gpu:" not in line)
    (statefulset,) = k8s_documents(cpu_text)
    kubernetes_validate.validate(statefulset, K8S_VERSION, strict=True)
    assert "nvidia.com/gpu" not in json.dumps(node_container(statefulset)["resources"])
    gpu = node_container(k8s_kind("StatefulSet"))["resources"]
    assert gpu["requests"]["nvidia.com/gpu"] == gpu["limits"]["nvidia.com/gpu"] == "1"


def test_k8s_statefulset_wiring() -> None:
    """Seeds are the pods' stable names; probes, token, and metrics point where they should."""
    statefulset, service, secret = (k8s_kind(k) for k in ("StatefulSet", "Service", "Secret"))
    spec, pod = statefulset["spec"], statefulset["spec"]["template"]
    container = node_container(statefulset)
    args = parse_node_args(container["args"], "deploy/k8s/statefulset.yaml")

    # headless Service, and one seed per replica, named <statefulset>-<i>.<service>
    name, service_name = statefulset["metadata"]["name"], spec["serviceName"]
    assert service["metadata"]["name"] == service_name
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert spec["podManagementPolicy"] == "Parallel"
    assert args.peers == [f"{name}-{i}.{service_name}:{GRPC_PORT}" for i in range(spec["replicas"])]
    assert args.advertise == f"$(POD_NAME).{service_name}:{GRPC_PORT}"
    assert args.listen == f"0.0.0.0:{GRPC_PORT}"
    assert args.mdns is False
    assert args.wait_for_peers == spec["replicas"] - 1

    # native gRPC probes against grpc.health.v1
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == GRPC_PORT, probe

    # the token: a Secret mounted as the file --token-file reads
    (volume,) = [v for v in pod["spec"]["volumes"] if "secret" in v]
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    (key,) = secret["stringData"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    assert args.token_file == f"{mount['mountPath']}/{key}"

    # metrics: served where the Prometheus annotations say
    annotations = pod["metadata"]["annotations"]
    assert args.metrics_port == METRICS_PORT
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(METRICS_PORT)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": GRPC_PORT, "metrics": METRICS_PORT}
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True


# --- Compose ----------------------------------------------------------------------------------


def test_compose_file_parses_as_compose_spec() -> None:
    doc = compose()
    assert "version" not in doc, "obsolete in Compose v2"
    assert {k for k in doc if not k.startswith("x-")} <= COMPOSE_TOP_LEVEL
    assert sorted(doc["services"]) == [f"node-{i}" for i in range(4)]
    for name, service in doc["services"].items():
        assert service["image"] == "gosgd-p2p:latest", name
        assert service["build"]["context"] == "..", name
        assert set(service["networks"]) <= set(doc["networks"]), name


def test_compose_commands_are_valid_node_flags() -> None:
    """Each node runs mDNS plus every other node as a seed, and waits for all of them."""
    services = compose()["services"]
    for name, service in services.items():
        args = parse_node_args(service["command"], f"deploy/docker-compose.yml {name}")
        assert args.mdns is True, name
        assert sorted(args.peers) == sorted(f"{s}:{GRPC_PORT}" for s in services if s != name)
        assert args.listen == f"0.0.0.0:{GRPC_PORT}", name
        assert args.wait_for_peers == len(services) - 1, name
        assert args.metrics_port == METRICS_PORT, name
        # off their own host, nodes without a token answer nobody (protected mode)
        assert args.token_file == "/run/secrets/cluster-token", name
        assert service["secrets"] == ["cluster-token"], name
    assert (DEPLOY / compose()["secrets"]["cluster-token"]["file"]).read_text().strip()


# --- Dockerfile -------------------------------------------------------------------------------


def test_dockerfile_command_and_healthcheck() -> None:
    assert dockerfile_json("ENTRYPOINT") == ["gosgd-node"]
    args = parse_node_args(dockerfile_json("CMD"), "Dockerfile CMD")
    assert args.listen == f"0.0.0.0:{GRPC_PORT}"
    assert args.metrics_port == METRICS_PORT
    health = dockerfile_json("HEALTHCHECK")
    assert health[:3] == ["gosgd-health", "--address", f"127.0.0.1:{GRPC_PORT}"]
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(rf"^EXPOSE {GRPC_PORT} {METRICS_PORT}$", text, re.MULTILINE)
    (user,) = re.findall(r"^USER (\S+)$", text, re.MULTILINE)
    assert user not in ("root", "0")
