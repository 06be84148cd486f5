"""How many CPUs this process may use: the one rule every pool and trainer sizes its threads by.

`os.cpu_count()` counts the machine's cores, not the ones this process may run on. On a shared
machine, under `taskset`, or in a container with `--cpus 1`, a LightGBM fit sized by it runs more
OpenMP threads than there are CPUs, and they spin waiting for each other (measured: the same fit
took 241 s with 2 threads and 3.3 s with 1 on a busy 2-core machine). The usable count is the
smallest of the CPU affinity mask, the container's CPU quota (cgroup v2 `cpu.max`, cgroup v1
`cpu.cfs_quota_us` / `cpu.cfs_period_us`) and `FLYWHEEL_CPUS` when the user sets it.

`compute_budget(n)` lowers it for a stretch of work in this process (the replay does, so that its
retrains and its oracle's processes together never run more compute threads than there are CPUs).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

CPUS_ENV = "FLYWHEEL_CPUS"
CGROUP_ROOT = Path("/sys/fs/cgroup")
_budget: list[int] = []  # innermost compute_budget() last


def affinity_cpus() -> set[int]:
    """The CPU numbers the scheduler lets this process run on."""
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    # macOS and Windows have no affinity mask to read: Python 3.13's per-process count, else the cores
    count = getattr(os, "process_cpu_count", os.cpu_count)()
    return set(range(count or 1))


def cpuset_cpus(root: Path = CGROUP_ROOT) -> set[int]:
    """The CPUs a process here may be moved to (the container's cpuset), which can be more than
    its current affinity: a server pinned to CPU 0 may still place its log sink on CPU 1. Read
    from cgroup v2's `cpuset.cpus.effective` or v1's `cpuset/cpuset.effective_cpus`, else the
    kernel's online CPUs, else this process's affinity."""
    for path in (root / "cpuset.cpus.effective", root / "cpuset" / "cpuset.effective_cpus"):
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        cpus = _cpu_list(text)
        if cpus:
            return cpus
    return _online_cpus() or affinity_cpus()


def _online_cpus(path: Path = Path("/sys/devices/system/cpu/online")) -> set[int]:
    """The CPUs the kernel has online ("0-3,6"), empty where that is not readable."""
    try:
        text = path.read_text().strip()
    except OSError:
        return set()
    return _cpu_list(text)


def _cpu_list(text: str) -> set[int]:
    cpus: set[int] = set()
    for part in filter(None, text.split(",")):
        low, _, high = part.partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    return cpus


def cgroup_quota(root: Path = CGROUP_ROOT, self_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """The container's CPU quota in CPUs (1.5 for `--cpus 1.5`), None where no quota is set.

    Reads cgroup v2's `cpu.max` ("max 100000" or "150000 100000") and cgroup v1's
    `cpu.cfs_quota_us` (-1 for none) over `cpu.cfs_period_us`, in this process's own cgroup when
    it is visible under `root` and at `root` itself otherwise (inside a container the namespace
    shows its own cgroup there). The smallest quota found wins."""
    quotas = [q for folder in _cgroup_folders(root, self_cgroup) for q in (_v2(folder), _v1(folder))
              if q is not None]
    return min(quotas) if quotas else None


def usable_cpus(env: Mapping[str, str] | None = None) -> int:
    """How many compute threads this process should run at once (at least 1)."""
    env = os.environ if env is None else env
    count = len(affinity_cpus())
    quota = cgroup_quota()
    if quota is not None:
        count = min(count, max(1, math.floor(quota)))  # 1.5 CPUs: one thread never throttled
    wanted = env.get(CPUS_ENV, "").strip()
    if wanted.isdigit() and int(wanted) > 0:
        count = min(count, int(wanted))
    if _budget:
        count = min(count, _budget[-1])
    return max(1, count)


@contextlib.contextmanager
def compute_budget(threads: int) -> Iterator[None]:
    """Within the block, `usable_cpus()` answers at most `threads` in this process."""
    _budget.append(max(1, threads))
    try:
        yield
    finally:
        _budget.pop()


def _cgroup_folders(root: Path, self_cgroup: Path) -> list[Path]:
    folders = [root, root / "cpu", root / "cpu,cpuacct", root / "cpuacct,cpu"]
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:  # "0::/user.slice" (v2) or "1:cpu,cpuacct:/docker/abc" (v1)
        parts = line.split(":", 2)
        if len(parts) != 3 or parts[2] in ("", "/"):
            continue
        controllers = parts[1].split(",")
        rel = parts[2].lstrip("/")
        if parts[1] == "":
            folders.append(root / rel)
        elif "cpu" in controllers:
            folders += [root / parts[1] / rel, root / "cpu" / rel]
    return [f for f in dict.fromkeys(folders) if f.is_dir()]


def _v2(folder: Path) -> float | None:
    try:
        quota, *period = (folder / "cpu.max").read_text().split()
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return int(quota) / int(period[0] if period else 100_000)
    except (ValueError, ZeroDivisionError):
        return None


def _v1(folder: Path) -> float | None:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None
