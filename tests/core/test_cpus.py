"""The CPUs this process may use: affinity, a container's quota (cgroup v1 and v2), FLYWHEEL_CPUS
and a replay's budget; what trainers and OpenMP do with it."""

import os
import subprocess
import sys

import pytest

from flywheel.core.cpus import cgroup_quota, compute_budget, usable_cpus


def write(folder, files):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)


def test_no_cgroup_files_means_no_quota(tmp_path):
    assert cgroup_quota(tmp_path, tmp_path / "missing") is None


def test_cgroup_v2_cpu_max_is_read_in_cpus(tmp_path):
    write(tmp_path, {"cpu.max": "150000 100000\n"})
    assert cgroup_quota(tmp_path, tmp_path / "none") == 1.5
    write(tmp_path, {"cpu.max": "max 100000\n"})
    assert cgroup_quota(tmp_path, tmp_path / "none") is None


def test_cgroup_v1_quota_and_period_as_docker_cpus_writes_them(tmp_path):
    write(tmp_path / "cpu", {"cpu.cfs_quota_us": "100000\n", "cpu.cfs_period_us": "100000\n"})
    assert cgroup_quota(tmp_path, tmp_path / "none") == 1.0
    write(tmp_path / "cpu", {"cpu.cfs_quota_us": "-1\n"})
    assert cgroup_quota(tmp_path, tmp_path / "none") is None


def test_the_process_own_cgroup_is_found_from_proc_self_cgroup(tmp_path):
    """On a host (not inside the container's namespace) the quota is in the process's own group."""
    write(tmp_path / "cpu,cpuacct" / "docker" / "abc", {"cpu.cfs_quota_us": "50000",
                                                       "cpu.cfs_period_us": "100000"})
    write(tmp_path / "user.slice", {"cpu.max": "300000 100000"})
    own = tmp_path / "self-cgroup"
    own.write_text("4:memory:/docker/abc\n2:cpu,cpuacct:/docker/abc\n0::/user.slice\n")
    assert cgroup_quota(tmp_path, own) == 0.5  # the smallest quota found wins


def test_flywheel_cpus_and_a_budget_lower_the_count_never_below_one():
    here = usable_cpus({})
    assert usable_cpus({"FLYWHEEL_CPUS": "1"}) == 1
    assert usable_cpus({"FLYWHEEL_CPUS": "999"}) == here  # never more than the machine gives
    assert usable_cpus({"FLYWHEEL_CPUS": "zero"}) == here
    with compute_budget(1):
        assert usable_cpus({}) == 1
        with compute_budget(0):
            assert usable_cpus({}) == 1
    assert usable_cpus({}) == here


def _in_child(code, prefix=()):
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "FLYWHEEL_CPUS")}
    done = subprocess.run([*prefix, sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_under_taskset_one_cpu_the_trainer_runs_one_thread():
    """taskset -c 0: affinity says one CPU; LightGBM's parameters are sized by it."""
    code = ("from flywheel.core.cpus import usable_cpus\n"
            "from flywheel.training.trainers import LIGHTGBM_DEFAULTS\n"
            "assert 'num_threads' not in LIGHTGBM_DEFAULTS\n"
            "print(usable_cpus())")
    assert _in_child(code, ("taskset", "-c", "0")) == "1"


def test_importing_flywheel_shortens_openmps_spin_before_any_trainer_loads():
    code = ("import sys, os; import flywheel.training.trainers\n"
            "assert 'lightgbm' not in sys.modules\n"  # libgomp not loaded yet: the setting counts
            "print(os.environ['GOMP_SPINCOUNT'], os.environ.get('OMP_WAIT_POLICY'))")
    assert _in_child(code) == "1000 None"


@pytest.mark.parametrize(("variable", "value"), [("OMP_WAIT_POLICY", "PASSIVE"), ("GOMP_SPINCOUNT", "50")])
def test_a_users_choice_of_openmp_waiting_is_kept(variable, value):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    done = subprocess.run([sys.executable, "-c", "import os, flywheel; "
                           "print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))"],
                          capture_output=True, text=True, env={**env, variable: value}, timeout=60)
    assert done.stdout.split() == ([value, "None"] if variable == "OMP_WAIT_POLICY" else ["None", value])


def test_onnx_runtime_writes_nothing_under_the_users_home(tmp_path):
    """It kept a device id and a database in ~/.cache/Microsoft/DeveloperTools/.onnxruntime."""
    env = {k: v for k, v in os.environ.items() if k not in ("ORT_DISABLE_TELEMETRY", "XDG_CACHE_HOME")}
    code = ("import flywheel, numpy as np\n"
            "from flywheel.training.onnx import new_session\n"
            "import onnxruntime\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**env, "HOME": str(tmp_path)}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / ".cache" / "Microsoft").exists()


def test_the_cpuset_lists_every_cpu_a_process_may_be_moved_to(tmp_path):
    from flywheel.core.cpus import cpuset_cpus

    write(tmp_path / "cpuset", {"cpuset.effective_cpus": "0-2,5\n"})
    assert cpuset_cpus(tmp_path) == {0, 1, 2, 5}
    write(tmp_path, {"cpuset.cpus.effective": "3\n"})  # cgroup v2 first
    assert cpuset_cpus(tmp_path) == {3}
    assert cpuset_cpus(tmp_path / "none") >= os.sched_getaffinity(0)  # the kernel's online CPUs
