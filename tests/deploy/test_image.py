"""The serving image, built and run as a user would: on a local Debian base (nothing can be pulled
here), against the champion of a project trained in this test. The project folder is mounted at
the same path in the container (the MLflow store records absolute artifact paths) and the
container's port is published on 127.0.0.1. Every platform contract is checked against the
running container, then a promotion on the host must reach it and `docker stop` must leave every
answered prediction in the log.

A machine where no Docker engine can be started fails these tests; they never skip.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import yaml

from flywheel.image import build_image, docker
from flywheel.lifecycle.aliases import promote
from flywheel.lifecycle.train import train_challenger
from flywheel.registry import Registry
from flywheel.serving.process import free_port
from flywheel.serving.tabular.runtime import load_version
from tests.conftest import REPO, example_config, load_project, load_sample

pytestmark = [pytest.mark.serial, pytest.mark.slow]
BASE = os.environ.get("FLYWHEEL_TEST_BASE_IMAGE", "flywheel-base:bookworm")
TAG = "flywheel-test:serving"
VERTEX_PREDICT = "/v1/endpoints/7/deployedModels/3:predict"


def engine() -> None:
    """A Docker engine that answers, and the local base image; started or made when missing."""
    for script in ("ensure-docker.sh", "make-base-image.sh"):
        done = subprocess.run([str(REPO / "scripts" / script)], capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{script}: {done.stderr[-3000:]}"


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    engine()
    started = time.perf_counter()
    built = build_image("serving", tag=TAG, base=BASE)
    print(f"serving image built in {time.perf_counter() - started:.0f}s: {built.size_bytes / 1e6:.0f} MB")
    yield built.tag
    docker("image", "prune", "--force", check=False)  # the replaced build's layers: disk, not cache


@pytest.fixture(scope="module")
def project(tmp_path_factory, sba_sample):
    folder = tmp_path_factory.mktemp("image") / "proj"
    folder.mkdir()
    cfg = example_config()
    cfg["model"]["params"] = {"num_boost_round": 40}
    (folder / "flywheel.yaml").write_text(yaml.safe_dump(cfg))
    project = load_sample(load_project(folder / "flywheel.yaml",
                                       env={"FLYWHEEL_HOME": str(folder / ".flywheel")}), sba_sample)
    assert train_challenger(project).promoted
    # The container runs as an unprivileged user: it must write the state database (and its WAL)
    # and read the registry.
    subprocess.run(["chmod", "-R", "a+rwX", str(folder)], check=True)
    return project


@pytest.fixture(scope="module")
def records(project, sba_sample):
    spec = load_version(Registry.for_project(project), 1).spec
    rows = sba_sample[spec.input_columns].head(40)
    return [{c: (None if v is None or (isinstance(v, float) and np.isnan(v)) else
                 (v.item() if hasattr(v, "item") else v)) for c, v in row.items()}
            for _, row in rows.iterrows()]


class Container:
    def __init__(self, tag: str, project, env: dict[str, str], user: str | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.name = f"flywheel-test-{self.port}"
        folder = str(project.path.parent)
        args = ["run", "--detach", "--name", self.name, "--publish", f"127.0.0.1:{self.port}:8080",
                "--volume", f"{folder}:{folder}", "--env", f"FLYWHEEL_CONFIG={project.path}"]
        for key, value in {"FLYWHEEL_HOME": str(project.home), **env}.items():
            args += ["--env", f"{key}={value}"]
        if user:
            args += ["--user", user]
        self.started = time.perf_counter()
        docker(*args, tag)
        self.served = 0  # records answered 200: each must reach the log

    def wait_ready(self, timeout: float = 90) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return time.perf_counter() - self.started
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"not ready after {timeout}s:\n{self.logs()}")

    def logs(self) -> str:
        done = docker("logs", self.name, check=False)
        return (done.stdout + done.stderr)[-4000:]

    def inspect(self, fmt: str) -> str:
        return docker("inspect", "--format", fmt, self.name).stdout.strip()

    def remove(self) -> None:
        docker("rm", "--force", self.name, check=False)


@pytest.fixture(scope="module")
def container(image, project):
    box = Container(image, project, {"AIP_PREDICT_ROUTE": VERTEX_PREDICT,
                                     "AIP_HEALTH_ROUTE": "/vertex/health",
                                     "FLYWHEEL_SERVING__RELOAD_INTERVAL_S": "0.5"})
    try:
        print(f"docker run to /ready: {box.wait_ready():.1f}s")
        yield box
    finally:
        box.remove()


@pytest.mark.parametrize(("limit", "expected"), [(["--cpus", "1"], "1 1.0"), (["--cpus", "1.5"], "1 1.5"),
                                                 (["--cpuset-cpus", "0"], "1 None")])
def test_in_a_container_threads_follow_its_cpu_quota_and_cpuset(image, limit, expected):
    """Docker here writes the quota to cgroup v1's cpu.cfs_quota_us; a v2 host to cpu.max. Both
    are read: a container with --cpus 1 on a bigger machine runs one compute thread."""
    code = ("from flywheel.core.cpus import cgroup_quota, usable_cpus; "
            "print(usable_cpus(), cgroup_quota())")
    done = docker("run", "--rm", *limit, "--entrypoint", "/opt/flywheel/bin/python", image, "-c", code)
    assert done.stdout.strip() == expected, done.stdout + done.stderr


def test_the_image_is_small_non_root_without_build_tools_or_training_libraries(image):
    size = int(docker("image", "inspect", "--format", "{{.Size}}", image).stdout)
    assert size < 500e6, f"{size / 1e6:.0f} MB"
    config = json.loads(docker("image", "inspect", "--format", "{{json .Config}}", image).stdout)
    assert config["User"] == "10001:10001" and config["Healthcheck"]["Test"][-1] == "health"
    assert config["Entrypoint"] == ["flywheel-entrypoint"] and config["Cmd"] == ["serve"]
    probe = ("import importlib.util as u, shutil; "
             "print([m for m in ('torch','transformers','prefect','evidently','pandas','sklearn',"
             "'lightgbm','duckdb') if u.find_spec(m)]); "
             "print([t for t in ('gcc','cc','make','pip','pip3','apt-get') if shutil.which(t)])")
    done = docker("run", "--rm", "--entrypoint", "python", image, "-c", probe)
    libraries, tools = done.stdout.splitlines()
    assert libraries == "[]", libraries
    assert tools in ("[]", "['apt-get']"), tools  # the base's own package manager may stay
    assert docker("run", "--rm", "--entrypoint", "id", image, "-u").stdout.strip() == "10001"
    assert docker("run", "--rm", "--entrypoint", "sh", image, "-c", "ls /wheels 2>&1 || true").stdout \
        .startswith("ls: cannot access")


def test_the_container_serves_predicts_and_reports_metrics(container, records):
    assert httpx.get(f"{container.url}/ready").json()["version"] == 1
    r = httpx.post(f"{container.url}/v1/predict", json=records[:5], timeout=30)
    assert r.status_code == 200 and len(r.json()["predictions"]) == 5, r.text
    container.served += 5
    bad = httpx.post(f"{container.url}/v1/predict", json={**records[0], "gr_appv": "lots"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "gr_appv"]
    metrics = httpx.get(f"{container.url}/metrics").text
    assert 'flywheel_predictions_total{model_version="1"} 5.0' in metrics, metrics[:3000]
    deadline = time.monotonic() + 60
    while container.inspect("{{.State.Health.Status}}") != "healthy":
        assert time.monotonic() < deadline, container.logs()
        time.sleep(1)


def test_sagemaker_contract(container, records):
    assert httpx.get(f"{container.url}/ping").status_code == 200
    r = httpx.post(f"{container.url}/invocations", json={"instances": records[:3]})
    assert r.status_code == 200 and len(r.json()["predictions"]) == 3, r.text
    names = list(records[0])
    csv = "".join(",".join("" if row[n] is None else str(row[n]) for n in names) + "\n"
                  for row in records[:4])
    meta = [i["name"] for i in httpx.get(f"{container.url}/v2/models/sba-loans").json()["inputs"]]
    if meta != names:  # no header: the values must come in the model's input order
        csv = ",".join(names) + "\n" + csv
    r = httpx.post(f"{container.url}/invocations", content=csv,
                   headers={"content-type": "text/csv", "accept": "text/csv"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv"), r.text
    assert len(r.text.splitlines()) == 5
    container.served += 7


def test_vertex_ai_contract(container, records):
    assert httpx.get(f"{container.url}/vertex/health").status_code == 200
    r = httpx.post(f"{container.url}{VERTEX_PREDICT}", json={"instances": records[:2]})
    assert r.status_code == 200 and len(r.json()["predictions"]) == 2, r.text
    container.served += 2


def test_open_inference_protocol_v2_contract(container, records):
    url = container.url
    assert httpx.get(f"{url}/v2/health/live").status_code == 200
    assert httpx.get(f"{url}/v2/health/ready").status_code == 200
    assert httpx.get(f"{url}/v2").json()["name"] == "flywheel"
    assert httpx.get(f"{url}/v2/models/sba-loans/ready").json()["ready"] is True
    meta = httpx.get(f"{url}/v2/models/sba-loans/versions/1").json()
    types = {i["name"]: i["datatype"] for i in meta["inputs"]}
    inputs = [{"name": n, "shape": [2], "datatype": types[n], "data": [r[n] for r in records[:2]]}
              for n in types]
    r = httpx.post(f"{url}/v2/models/sba-loans/versions/1/infer", json={"inputs": inputs})
    assert r.status_code == 200 and r.json()["outputs"][0]["shape"] == [2], r.text
    container.served += 2
    gone = httpx.post(f"{url}/v2/models/sba-loans/versions/9/infer", json={"inputs": inputs})
    assert gone.status_code == 404


def test_hugging_face_spaces_metadata_and_the_user_it_runs_as(image, project):
    """A Space (Docker SDK) reads `sdk` and `app_port` from its README and runs the container as
    uid 1000: the image must serve on that port as that user."""
    readme = (REPO / "deploy" / "huggingface" / "README.md").read_text()
    front = yaml.safe_load(readme.split("---")[1])
    assert front["sdk"] == "docker" and front["app_port"] == 8080
    assert "FROM ${IMAGE}" in (REPO / "deploy" / "huggingface" / "Dockerfile").read_text()
    # Its own home (the image's, writable by any user); the project's registry and state database.
    space = Container(image, project, {"FLYWHEEL_HOME": "/var/lib/flywheel",
                                       "FLYWHEEL_STORES__TRACKING": project.tracking_url,
                                       "FLYWHEEL_STORES__STATE": project.state_url}, user="1000:1000")
    try:
        space.wait_ready()
        assert space.inspect("{{.Config.User}}") == "1000:1000"
    finally:
        space.remove()


def test_a_promotion_on_the_host_reaches_the_container_and_docker_stop_loses_no_prediction(
        container, project, records):
    second = load_project(project.path, env={**os.environ, "FLYWHEEL_HOME": str(project.home),
                                             "FLYWHEEL_MODEL__PARAMS__NUM_BOOST_ROUND": "80"})
    result = train_challenger(second)
    if not result.promoted:
        promote(project, result.version, reason="image test")
    deadline = time.monotonic() + 60
    while httpx.get(f"{container.url}/ready").json().get("version") != result.version:
        assert time.monotonic() < deadline, container.logs()
        time.sleep(0.2)

    with httpx.Client(base_url=container.url, timeout=30) as client:
        for i in range(150):
            r = client.post("/v1/predict", json=records[i % 30: i % 30 + 4])
            assert r.status_code == 200
            container.served += 4
    stopped = subprocess.run(["docker", "stop", "--time", "60", container.name], capture_output=True,
                             text=True, timeout=120)
    assert stopped.returncode == 0, stopped.stderr
    assert container.inspect("{{.State.ExitCode}}") == "0", container.logs()
    logs = container.logs()
    assert '"event":"worker_stopped"' in logs and '"dropped":0' in logs, logs
    with sqlite3.connect(project.home / "state.db") as db:
        logged = db.execute("SELECT count(*) FROM predictions").fetchone()[0]
        versions = dict(db.execute("SELECT model_version, count(*) FROM predictions GROUP BY 1").fetchall())
    assert logged == container.served, (logged, container.served)
    assert versions[result.version] == 600
