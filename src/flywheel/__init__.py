"""Flywheel: train, track, register, serve, log, monitor, retrain, gate, promote, alert."""

import os as _os

# OpenMP (LightGBM's and PyTorch's libgomp) busy-waits between parallel regions, by default for
# up to 300,000 spins: on a machine shared with other work the spinning threads take the CPU from
# the ones doing the work (measured here: a LightGBM fit on 300k rows, 2 threads beside
# `stress-ng --cpu 2`, took 17.8 s instead of 2.8 s). Passive waiting (no spin) fixes that but
# makes every parallel region wake a sleeping thread: 1.8x slower on an idle machine, 4.6x on
# small data. A short spin of 1,000 keeps the idle speed (within 10%) and most of passive's gain
# under load (7.0 s there): see benchmarks/cpu_threads.py. libgomp reads it once, when it loads,
# so it is set here, before any trainer is imported, and child processes inherit it. A user's
# own OMP_WAIT_POLICY or GOMP_SPINCOUNT wins.
if "OMP_WAIT_POLICY" not in _os.environ:
    _os.environ.setdefault("GOMP_SPINCOUNT", "1000")

# ONNX Runtime keeps a device id and a database for its telemetry under the user's cache folder
# (~/.cache/Microsoft/DeveloperTools/.onnxruntime), outside the folders a project owns. Off, as
# MLflow's and Evidently's are; set before onnxruntime loads.
_os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
