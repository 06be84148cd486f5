"""The container images, one run on one machine, printed with ratios:

- size of the serving and the full image, next to MLflow's `mlflow models build-docker` image of the
  same model, built here on the same base: the Dockerfile `mlflow models generate-dockerfile`
  writes (nginx from Debian, MLflow, the model's requirements), with pip's downloads replaced by
  wheels made on the host, as for our images (no package index is reachable from a build here);
- seconds from `docker run` to a ready answer (median of three starts), for both;
- requests/s and p99 of the serving image against `flywheel serve` outside a container, as in
  serve_vs_mlflow.py: one worker pinned to CPU 0 (docker --cpuset-cpus 0, taskset), wrk on CPU 1
  with 8 connections and single-record bodies; the container on the host's network (no proxy:
  what a Kubernetes pod gets) and behind a published port (Docker's userland proxy).

Usage: python benchmarks/deploy_images.py [--base IMAGE] [--seconds 10]
(needs a Docker engine: scripts/ensure-docker.sh, and scripts/make-base-image.sh for the base).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from serve_vs_mlflow import BIN, REPO, Server, setup, wrk

sys.path.insert(0, str(REPO / "src"))
from flywheel.image import build_image, docker  # noqa: E402
from flywheel.serving.process import free_port  # noqa: E402

MLFLOW_TAG = "flywheel-bench:mlflow-build-docker"


def mlflow_image(base: str, home: Path, env: dict[str, str]) -> int:
    """MLflow's build-docker image of champion v1, built on `base` from host-made wheels."""
    context = home / "mlflow-docker"
    subprocess.run([str(BIN / "mlflow"), "models", "generate-dockerfile", "-m", "models:/sba-loans/1",
                    "-d", str(context)], env=env, check=True, capture_output=True)
    generated = (context / "Dockerfile").read_text()
    assert "pip install mlflow==" in generated and "nginx" in generated, generated
    mlflow_version = generated.split("pip install mlflow==")[1].split()[0]
    wheels = context / "wheels"
    subprocess.run([str(BIN / "python"), "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(wheels),
                    "--constraint", str(REPO / "requirements.lock"), f"mlflow=={mlflow_version}",
                    "-r", str(context / "model_dir" / "requirements.txt")], check=True)
    (context / "Dockerfile").write_text(f"""
FROM {base} AS install
COPY wheels /wheels
COPY model_dir/requirements.txt /requirements.txt
RUN python3 -m venv /opt/venv && /opt/venv/bin/pip install --no-cache-dir --no-index \\
    --find-links /wheels mlflow=={mlflow_version} -r /requirements.txt
FROM {base}
RUN apt-get -y update && apt-get install -y --no-install-recommends nginx && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/mlflow
COPY --from=install /opt/venv /opt/venv
COPY model_dir /opt/ml/model
ENV MLFLOW_DISABLE_ENV_CREATION=True PATH=/opt/venv/bin:$PATH
RUN chmod o+rwX /opt/mlflow/
ENTRYPOINT ["python", "-c", "from mlflow.models import container as C; C._serve('local')"]
""")
    docker("build", "--tag", MLFLOW_TAG, str(context), timeout=1800)
    return int(docker("image", "inspect", "--format", "{{.Size}}", MLFLOW_TAG).stdout)


def time_to_ready(args: list[str], url: str, name: str) -> float:
    started = time.perf_counter()
    docker("run", "--detach", "--name", name, *args)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(url, timeout=1).status_code == 200:
                    return time.perf_counter() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{name} not ready: {docker('logs', name, check=False).stderr[-2000:]}")
    finally:
        docker("rm", "--force", name, check=False)


def flywheel_run_args(home: Path, config: Path, image: str, port: int, host_network: bool) -> list[str]:
    net = ["--network", "host", "--env", f"PORT={port}"] if host_network else \
        ["--publish", f"127.0.0.1:{port}:8080"]
    return [*net, "--cpuset-cpus", "0", "--volume", f"{home}:{home}", "--env", f"FLYWHEEL_CONFIG={config}",
            "--env", f"FLYWHEEL_HOME={home / '.flywheel'}", image]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="flywheel-base:bookworm")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--full-image", help="measure this full image instead of building one (its "
                                             "build takes about 8 minutes here)")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is needed: apt-get install wrk")
    home = Path(tempfile.mkdtemp(prefix="flywheel-images-"))
    config, env, record, _ = setup(home)
    subprocess.run(["chmod", "-R", "a+rwX", str(home)], check=True)
    body = home / "record.json"
    body.write_text(json.dumps(record))

    sizes, built_s = {}, {}
    for kind in ("serving", "full"):
        if kind == "full" and args.full_image:
            sizes[kind] = int(docker("image", "inspect", "--format", "{{.Size}}", args.full_image).stdout)
            built_s[kind] = float("nan")
            continue
        built = build_image(kind, tag=f"flywheel-bench:{kind}", base=args.base)
        sizes[kind], built_s[kind] = built.size_bytes, built.seconds
    sizes["mlflow"] = mlflow_image(args.base, home, {**env, "MLFLOW_TRACKING_URI":
                                                     f"sqlite:///{home / '.flywheel' / 'mlflow.db'}"})
    sizes["base"] = int(docker("image", "inspect", "--format", "{{.Size}}", args.base).stdout)

    ready: dict[str, list[float]] = {"serving": [], "mlflow": []}
    for i in range(3):
        port = free_port()
        ready["serving"].append(time_to_ready(
            flywheel_run_args(home, config, "flywheel-bench:serving", port, False),
            f"http://127.0.0.1:{port}/ready", f"bench-ready-{i}"))
        port = free_port()
        ready["mlflow"].append(time_to_ready(["--publish", f"127.0.0.1:{port}:8080", MLFLOW_TAG],
                                             f"http://127.0.0.1:{port}/ping", f"bench-mlflow-{i}"))

    results = {}
    port = free_port()
    bare = Server([str(BIN / "flywheel"), "serve", "--config", str(config), "--port", str(port)],
                  env, f"http://127.0.0.1:{port}/ready")
    try:
        wrk(f"http://127.0.0.1:{port}/v1/predict", body, 3)  # warm up
        results["flywheel serve (bare)"] = wrk(f"http://127.0.0.1:{port}/v1/predict", body, args.seconds)
    finally:
        bare.stop()
    for label, host_network in (("serving image, host network", True),
                                ("serving image, published port", False)):
        port = free_port()
        name = f"bench-wrk-{port}"
        docker("run", "--detach", "--name", name,
               *flywheel_run_args(home, config, "flywheel-bench:serving", port, host_network))
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.2)
            wrk(f"{url}/v1/predict", body, 3)
            results[label] = wrk(f"{url}/v1/predict", body, args.seconds)
        finally:
            docker("rm", "--force", name, check=False)

    mb = {k: v / 1e6 for k, v in sizes.items()}
    print(f"\nImage sizes on {args.base} ({mb['base']:.0f} MB of it is the base):")
    print(f"  serving image     {mb['serving']:7.0f} MB  (built in {built_s['serving']:.0f} s)")
    print(f"  full image        {mb['full']:7.0f} MB  (built in {built_s['full']:.0f} s)")
    print(f"  MLflow build-docker {mb['mlflow']:5.0f} MB  "
          f"(serving image is {mb['serving'] / mb['mlflow']:.2f}x)")
    print("docker run to ready (median of 3): serving image "
          f"{statistics.median(ready['serving']):.1f} s, MLflow's {statistics.median(ready['mlflow']):.1f} s")
    base_rps = results["flywheel serve (bare)"]["rps"]
    print(f"\nOne worker on CPU 0, wrk -t1 -c8 on CPU 1, {args.seconds} s each:")
    for label, r in results.items():
        print(f"  {label:32s} {r['rps']:8.0f} req/s  p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  "
              f"x{r['rps'] / base_rps:.3f}  non-2xx {r['non2xx']}")
    shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
