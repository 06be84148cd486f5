"""The deployment files, checked offline as CI can: hadolint on the Dockerfiles, every Kubernetes
overlay rendered by `kubectl kustomize`, validated against a pinned Kubernetes version and scanned
by checkov, whose failed checks must each be justified on the docs' Deploy page. No cluster runs here.

The checkers live in a venv of their own, made once from deploy/tools/requirements.lock in the
download cache (checkov pins many packages the project's venv also has).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from flywheel.config import cache_dir, load_project
from tests.conftest import REPO

K8S = REPO / "deploy" / "kubernetes"
OVERLAYS = ["dev", "prod"]
KUBERNETES_VERSION = "1.33"
LOCK = REPO / "deploy" / "tools" / "requirements.lock"
TOOLS = cache_dir() / f"deploy-tools-{hashlib.sha256(LOCK.read_bytes()).hexdigest()[:12]}"


@pytest.fixture(scope="session")
def tools() -> Path:
    bin_dir = TOOLS / "bin"
    TOOLS.parent.mkdir(parents=True, exist_ok=True)
    # Each xdist worker has its own session: the first to get here installs, the other waits
    # (without the lock the second one removed the first one's half-made venv under it).
    with open(TOOLS.parent / f"{TOOLS.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (TOOLS / ".installed").is_file():
            shutil.rmtree(TOOLS, ignore_errors=True)
            subprocess.run(["python3", "-m", "venv", str(TOOLS)], check=True, timeout=120)
            subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "--quiet", "-r", str(LOCK)],
                           check=True, timeout=900)
            (TOOLS / ".installed").touch()
    return bin_dir


def render(overlay: str) -> list[dict]:
    done = subprocess.run(["kubectl", "kustomize", str(K8S / "overlays" / overlay)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("k8s")
    files = {}
    for overlay in OVERLAYS:
        files[overlay] = out / f"{overlay}.yaml"
        files[overlay].write_text(yaml.safe_dump_all(render(overlay)))
    return files


def test_the_dockerfiles_are_hadolint_clean(tools):
    for dockerfile in (REPO / "deploy" / "Dockerfile", REPO / "deploy" / "huggingface" / "Dockerfile"):
        done = subprocess.run([str(tools / "hadolint"), str(dockerfile)], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0 and done.stdout == "", f"{dockerfile}:\n{done.stdout}{done.stderr}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_overlay_renders_what_a_production_service_needs(overlay):
    docs = render(overlay)
    kinds = {(d["kind"], d["metadata"]["name"].rsplit("-", 1)[0] if d["kind"] == "ConfigMap"
              else d["metadata"]["name"]) for d in docs}
    assert {("Deployment", "flywheel-api"), ("Service", "flywheel-api"),
            ("PodDisruptionBudget", "flywheel-api"), ("HorizontalPodAutoscaler", "flywheel-api"),
            ("CronJob", "flywheel-pipeline"), ("Deployment", "flywheel-mlflow"),
            ("Service", "flywheel-mlflow"), ("ConfigMap", "flywheel-config"),
            ("ServiceAccount", "flywheel")} <= kinds
    assert all(d["metadata"].get("namespace", "").startswith("flywheel") for d in docs)
    api = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "flywheel-api")
    spec = api["spec"]
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    [box] = pod["containers"]
    assert box["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert box["livenessProbe"]["httpGet"]["path"] == "/health"
    assert box["securityContext"]["readOnlyRootFilesystem"] is True
    assert {"requests", "limits"} <= set(box["resources"])
    env = {e["name"]: e for e in box["env"]}
    assert all("valueFrom" not in e for e in env.values())  # secrets come as files
    assert env["FLYWHEEL_STORES__STATE_FILE"]["value"].startswith("/run/secrets/flywheel/")
    hpa = next(d for d in docs if d["kind"] == "HorizontalPodAutoscaler")
    assert {m["type"] for m in hpa["spec"]["metrics"]} == {"Resource", "Pods"}
    cron = next(d for d in docs if d["kind"] == "CronJob")
    args = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:2] == ["run", "--once"]
    config = next(d for d in docs if d["kind"] == "ConfigMap")
    assert "flywheel.yaml" in config["data"]
    # each pod mounts only the Secret's keys it reads, and every key it reads is mounted
    for doc in docs:
        if doc["kind"] not in ("Deployment", "CronJob"):
            continue
        pod = doc["spec"]["template"]["spec"] if doc["kind"] == "Deployment" else \
            doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        text = json.dumps(pod["containers"])
        read = set(re.findall(r"/run/secrets/flywheel/([a-z-]+)", text))
        [volume] = [v for v in pod["volumes"] if "secret" in v]
        assert {i["key"] for i in volume["secret"]["items"]} == read, doc["metadata"]["name"]


def test_the_manifests_config_is_a_valid_project(tmp_path):
    project = load_project(K8S / "base" / "flywheel.yaml", env={"FLYWHEEL_HOME": str(tmp_path)})
    assert project.config.registered_model


def test_overlays_validate_against_the_pinned_kubernetes_version(tools, rendered):
    done = subprocess.run([str(tools / "kubernetes-validate"), "--strict", "--quiet",
                           "-k", KUBERNETES_VERSION, *map(str, rendered.values())],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def justified_checks() -> set[str]:
    """The checkov check ids the docs' Deploy page justifies (one table row each)."""
    page = (REPO / "docs" / "deploy.md").read_text()
    return set(re.findall(r"^\| `(CKV2?_K8S_\d+)` \|", page, flags=re.M))


def test_checkov_fails_nothing_the_docs_do_not_justify(tools, rendered):
    folder = next(iter(rendered.values())).parent
    done = subprocess.run([str(tools / "checkov"), "-d", str(folder), "--framework", "kubernetes", "--output",
                           "json"], capture_output=True, text=True, timeout=600)
    report = json.loads(done.stdout)
    reports = report if isinstance(report, list) else [report]
    failed = {c["check_id"] for r in reports for c in r["results"]["failed_checks"]}
    passed = sum(r["summary"]["passed"] for r in reports)
    assert passed > 100  # it did scan the manifests
    assert failed <= justified_checks(), f"unjustified: {sorted(failed - justified_checks())}"


def test_an_image_is_never_built_with_a_password_in_its_config(tmp_path):
    """`image build --config` copies the config into a layer that everyone who pulls the image
    can read; a URL password there is refused before anything is built."""
    from flywheel.image import ImageError, prepare_context

    config = tmp_path / "flywheel.yaml"
    config.write_text((REPO / "examples" / "sba-loans" / "flywheel.yaml").read_text()
                      + "\nstores:\n  state: postgresql://flywheel:hunter2@db:5432/flywheel\n")
    with pytest.raises(ImageError, match="password"):
        prepare_context("serving", tmp_path / "context", config)
    assert not (tmp_path / "context" / "config" / "flywheel.yaml").exists()
