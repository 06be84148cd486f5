"""The one place that talks to MLflow: runs, metrics, artifacts, model versions and aliases."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import mlflow  # noqa: E402
from mlflow.entities import Metric, Param  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from flywheel.config import ProjectBase  # noqa: E402
from flywheel.core.errors import FlywheelError  # noqa: E402
from flywheel.core.secrets import redact  # noqa: E402
from flywheel.data.features import FeatureSpec  # noqa: E402

# MLflow logs each schema migration and model download at INFO; our steps report progress.
for _name in ("mlflow", "alembic"):
    logging.getLogger(_name).setLevel(logging.WARNING)


MODEL_ARTIFACT = "model"
ADAPTER_ARTIFACT = "adapter"
SPEC_ARTIFACT = "feature_spec.json"
CHAMPION = "champion"
CHALLENGER = "challenger"
# Users who speak in stages: Production is champion, Staging is challenger.
STAGE_ALIASES = {"production": CHAMPION, "staging": CHALLENGER}
ONNX_PIP_REQUIREMENTS = ["onnxruntime>=1.32,<1.33", "onnx>=1.23,<1.24", "numpy>=2.4,<2.5"]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    """A file's SHA-256, read in blocks (model files are hundreds of MB)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def onnx_signature(feature_spec: str) -> Any:
    """The MLflow signature of an ONNX export: one float32 column per feature, one output
    (`probability`, `value`, or one probability column per class)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    spec = FeatureSpec.from_json(feature_spec)
    single = "value" if spec.task == "regression" else "probability"
    outputs: list[ColSpec | TensorSpec] = ([ColSpec("float", c) for c in spec.classes]
                                           if spec.task == "multiclass" else [ColSpec("float", single)])
    inputs: list[ColSpec | TensorSpec] = [ColSpec("float", n) for n in spec.names]
    return ModelSignature(inputs=Schema(inputs),
                          outputs=Schema(outputs))


class RegistryError(FlywheelError):
    """The registry does not hold what was asked for, or a stored artifact fails its hash."""


@dataclass(frozen=True)
class VersionInfo:
    """A registered model version with the lineage and metrics recorded on its run."""

    name: str
    version: int
    run_id: str
    aliases: list[str]
    tags: dict[str, str]
    metrics: dict[str, float] = field(default_factory=dict)
    run_tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ServedArtifacts:
    """The files a version is served or evaluated from, each checked against its recorded hash."""

    onnx: bytes
    feature_spec: str


_REGISTRIES: dict[tuple[int, str, str, str], Registry] = {}


class Registry:
    """MLflow tracking and registry for one project: one experiment, one registered model."""

    @classmethod
    def for_project(cls, project: ProjectBase) -> Registry:
        """This process's registry of the project (built once: the client, the experiment lookup
        and the verified-artifact cache are shared by every step the process runs)."""
        key = (os.getpid(), project.tracking_url, project.config.project,
               project.config.registered_model)
        registry = _REGISTRIES.get(key)
        if registry is None:
            registry = _REGISTRIES[key] = cls(project.tracking_url, project.artifact_root,
                                              project.config.project, project.config.registered_model)
        registry.activate()
        return registry

    def __init__(self, tracking_url: str, artifact_root: Path, experiment: str, model_name: str):
        if tracking_url.startswith("postgresql://"):
            tracking_url = "postgresql+psycopg://" + tracking_url.removeprefix("postgresql://")
        self.tracking_url = tracking_url
        self.model_name = model_name
        self.downloads = 0  # model-version downloads from the store (each hash-checked)
        self._artifacts: dict[int, ServedArtifacts] = {}
        self.activate()
        self.client = MlflowClient(tracking_uri=tracking_url, registry_uri=tracking_url)
        found = self.client.get_experiment_by_name(experiment)
        if found is None and tracking_url.startswith(("http://", "https://")):
            # A tracking server keeps the artifacts where it is configured to (proxied artifact
            # storage: mlflow server --serve-artifacts); a local path would be this machine's only.
            self.experiment_id = self.client.create_experiment(experiment)
        elif found is None:
            artifact_root.mkdir(parents=True, exist_ok=True)
            self.experiment_id = self.client.create_experiment(
                experiment, artifact_location=(artifact_root / experiment).resolve().as_uri()
            )
        else:
            self.experiment_id = found.experiment_id

    def activate(self) -> None:
        """Point MLflow's fluent API (runs, model logging) at this registry's store."""
        mlflow.set_tracking_uri(self.tracking_url)
        mlflow.set_registry_uri(self.tracking_url)

    # ---- runs ----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def run(self, run_name: str, tags: dict[str, str]) -> Iterator[str]:
        """An MLflow run; ends FAILED if the block raises, so a crash is visible in the UI."""
        self.activate()
        with mlflow.start_run(experiment_id=self.experiment_id, run_name=run_name,
                              tags=_scrubbed(tags)) as r:
            yield r.info.run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        items = [Param(k, redact(str(v))[:6000]) for k, v in sorted(params.items())]
        for start in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[start : start + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        ts = _now_ms()
        self._log_metric_list(run_id, [Metric(k, float(v), ts, step) for k, v in metrics.items()])

    def log_history(self, run_id: str, history: dict[str, list[float]]) -> None:
        """Per-iteration (or per-epoch) curves, one metric per name, step = iteration."""
        ts = _now_ms()
        items = [Metric(name, float(v), ts, step)
                 for name, values in history.items() for step, v in enumerate(values, start=1)]
        self._log_metric_list(run_id, items)

    def _log_metric_list(self, run_id: str, items: list[Metric]) -> None:
        for start in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[start : start + 1000])

    def set_run_tags(self, run_id: str, tags: dict[str, str]) -> None:
        for k, v in _scrubbed(tags).items():
            self.client.set_tag(run_id, k, v)

    def log_artifact(self, run_id: str, path: Path, subdir: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), subdir)

    def log_text(self, run_id: str, text: str, name: str) -> None:
        self.client.log_text(run_id, text, name)

    # ---- model versions ------------------------------------------------------------------------

    def register_onnx(
        self, run_id: str, onnx_bytes: bytes, feature_spec: str, tags: dict[str, str]
    ) -> int:
        """Log the ONNX export as the run's model, register it, and record both files' hashes.

        The model carries a signature (the feature columns in, `probability` out), so MLflow's UI
        shows what the model takes and `mlflow.pyfunc` / `mlflow models serve` check the input.
        """
        import onnx

        proto = onnx.load_from_string(onnx_bytes)
        stored = proto.SerializeToString()
        self.client.log_text(run_id, feature_spec, SPEC_ARTIFACT)
        with _active(run_id):
            info = mlflow.onnx.log_model(
                proto, name=MODEL_ARTIFACT, pip_requirements=ONNX_PIP_REQUIREMENTS,
                save_as_external_data=False, signature=onnx_signature(feature_spec),
            )
        with contextlib.suppress(MlflowException):
            self.client.create_registered_model(self.model_name)
        # model_id: a tracking server accepts a models:/ source only with the logged model's id
        version = self.client.create_model_version(
            self.model_name, source=info.model_uri, run_id=run_id, model_id=info.model_id,
            tags={**_scrubbed(tags), "onnx_sha256": sha256(stored),
                  "feature_spec_sha256": sha256(feature_spec.encode())},
        )
        return int(version.version)

    def register_folder(self, run_id: str, folder: Path, artifact_path: str,
                        tags: dict[str, str]) -> int:
        """Log a folder of files (a LoRA adapter) as the run's model and register it.

        Each file's SHA-256 is recorded on the version (`sha256:<name>`), checked again by
        `download_verified` before anything loads it.
        """
        hashes = {f"sha256:{p.name}": sha256(p.read_bytes()) for p in sorted(folder.iterdir())
                  if p.is_file()}
        self.client.log_artifacts(run_id, str(folder), artifact_path)
        with contextlib.suppress(MlflowException):
            self.client.create_registered_model(self.model_name)
        source = f"{self.client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
        version = self.client.create_model_version(
            self.model_name, source=source, run_id=run_id,
            tags={**_scrubbed(tags), **hashes, "artifact_path": artifact_path})
        return int(version.version)

    def download_verified(self, version: int, dst: Path) -> Path:
        """The registered folder of a version, every file checked against its recorded hash."""
        info = self.version(version)
        artifact_path = info.tags.get("artifact_path")
        expected = {k.removeprefix("sha256:"): v for k, v in info.tags.items() if k.startswith("sha256:")}
        if not artifact_path or not expected:
            raise RegistryError(f"{self.model_name} v{version} has no registered file folder "
                                "(was it registered by flywheel finetune?)")
        folder = Path(self.client.download_artifacts(info.run_id, artifact_path, str(dst)))
        found = {p.name: sha256(p.read_bytes()) for p in folder.iterdir() if p.is_file()}
        if found != expected:
            bad = sorted(set(found.items()) ^ set(expected.items()))
            raise RegistryError(
                f"the files of {self.model_name} v{version} do not match the hashes recorded at "
                f"registration ({', '.join(sorted({name for name, _ in bad}))}); refusing to load them")
        return folder

    def attach_folder(self, version: int, folder: Path, artifact_path: str) -> None:
        """Log more files of a version (an inference export) under `artifact_path` of its run, each
        file's SHA-256 recorded on the version (`file_sha256:<artifact_path>/<name>`)."""
        info = self.version(version)
        hashes = {f"file_sha256:{artifact_path}/{p.name}": file_sha256(p) for p in sorted(folder.iterdir())
                  if p.is_file()}
        self.client.log_artifacts(info.run_id, str(folder), artifact_path)
        self.set_version_tags(version, hashes)

    def attached_hashes(self, version: int, artifact_path: str) -> dict[str, str]:
        """File name -> sha256 of what `attach_folder` recorded under `artifact_path` (empty: none)."""
        prefix = f"file_sha256:{artifact_path}/"
        return {k.removeprefix(prefix): v for k, v in self.version(version).tags.items()
                if k.startswith(prefix)}

    def download_attached(self, version: int, artifact_path: str, dst: Path) -> Path:
        """The files `attach_folder` logged, in `dst`, every one checked against its recorded hash."""
        expected = self.attached_hashes(version, artifact_path)
        if not expected:
            raise RegistryError(f"{self.model_name} v{version} has no files under '{artifact_path}'")
        info = self.version(version)
        folder = Path(self.client.download_artifacts(info.run_id, artifact_path, str(dst)))
        found = {p.name: file_sha256(p) for p in folder.iterdir() if p.is_file()}
        if found != expected:
            bad = sorted({name for name, _ in set(found.items()) ^ set(expected.items())})
            raise RegistryError(f"the files under '{artifact_path}' of {self.model_name} v{version} do not "
                                f"match the hashes recorded ({', '.join(bad)}); refusing to load them")
        return folder

    def set_version_tags(self, version: int, tags: dict[str, str]) -> None:
        for k, v in _scrubbed(tags).items():
            self.client.set_model_version_tag(self.model_name, str(version), k, v)

    def set_alias(self, alias: str, version: int) -> None:
        self.client.set_registered_model_alias(self.model_name, alias, str(version))

    def alias_version(self, alias: str) -> int | None:
        alias = STAGE_ALIASES.get(alias.lower(), alias)
        try:
            return int(self.client.get_model_version_by_alias(self.model_name, alias).version)
        except MlflowException as exc:
            if exc.error_code in _NOT_FOUND:  # no such model, or the alias is not set
                return None
            raise RegistryError(f"the MLflow store did not answer: {exc.message}") from exc

    def version(self, version: int) -> VersionInfo:
        try:
            mv = self.client.get_model_version(self.model_name, str(version))
        except MlflowException:
            raise RegistryError(f"model '{self.model_name}' has no version {version}") from None
        if not mv.run_id:
            raise RegistryError(f"{self.model_name} v{version} was not registered from a run")
        run = self.client.get_run(mv.run_id)
        return VersionInfo(
            name=self.model_name, version=int(mv.version), run_id=mv.run_id,
            aliases=list(mv.aliases), tags=dict(mv.tags), metrics=dict(run.data.metrics),
            run_tags={k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")},
            params=dict(run.data.params),
        )

    def versions(self) -> list[int]:
        found = self.client.search_model_versions(f"name = '{self.model_name}'")
        return sorted(int(v.version) for v in found)

    def download_run_artifacts(self, version: int, artifact_path: str, dst: Path) -> Path:
        """A folder of the version's run artifacts under `dst` (run artifacts never change)."""
        info = self.version(version)
        target = dst / info.run_id / artifact_path
        if not target.is_dir():
            (dst / info.run_id).mkdir(parents=True, exist_ok=True)
            downloaded = self.client.download_artifacts(info.run_id, artifact_path, str(dst / info.run_id))
            target = Path(downloaded)
        return target

    def load_artifacts(self, version: int) -> ServedArtifacts:
        """The ONNX model and feature spec of a version, refused if either fails its hash.

        Downloaded once per registry object: a registered version's files never change, and the
        bytes kept are the ones that passed the hash check."""
        cached = self._artifacts.get(version)
        if cached is None:
            cached = self._artifacts[version] = self._download_artifacts(version)
        return cached

    def _download_artifacts(self, version: int) -> ServedArtifacts:
        self.downloads += 1
        info = self.version(version)
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = Path(mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{self.model_name}/{version}", dst_path=tmp))
            onnx_bytes = (model_dir / "model.onnx").read_bytes()
            spec_path = Path(self.client.download_artifacts(info.run_id, SPEC_ARTIFACT, tmp))
            spec = spec_path.read_text()
        for label, data, key in (("ONNX model", onnx_bytes, "onnx_sha256"),
                                 ("feature spec", spec.encode(), "feature_spec_sha256")):
            if sha256(data) != info.tags.get(key):
                raise RegistryError(
                    f"{label} of {self.model_name} v{version} does not match the hash recorded "
                    f"at registration ({key}); refusing to load it"
                )
        return ServedArtifacts(onnx=onnx_bytes, feature_spec=spec)


@contextlib.contextmanager
def _active(run_id: str) -> Iterator[None]:
    """Make `run_id` the active run for fluent calls, whether or not it already is."""
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        yield
        return
    with mlflow.start_run(run_id=run_id):
        yield


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)


_NOT_FOUND = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


def _scrubbed(tags: dict[str, str]) -> dict[str, str]:
    """Tags as MLflow stores them: any URL's password hidden (a reason, a lineage string may quote
    one), since everyone who can open the MLflow UI reads them."""
    return {k: redact(str(v)) for k, v in tags.items()}
