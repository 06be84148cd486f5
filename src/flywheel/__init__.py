"""Flywheel: train, track, register, serve, log, monitor, retrain, gate, promote, alert."""

import os as _os

# OpenMP (LightGBM's and PyTorch's libgomp) busy-waits between parallel regions by default: on a
# machine shared with other work, or with more threads than free CPUs, the spinning threads take
# the CPU from the ones doing the work. The setting is read once, when libgomp loads, so it is set
# here, before any trainer is imported, and child processes inherit it. A user's own value wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# ONNX Runtime keeps a device id and a database for its telemetry under the user's cache folder
# (~/.cache/Microsoft/DeveloperTools/.onnxruntime), outside the folders a project owns. Off, as
# MLflow's and Evidently's are; set before onnxruntime loads.
_os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
