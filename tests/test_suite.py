"""The test suite's own parallel setup: `make test` relies on xdist keeping an `xdist_group` on one
worker (a module's trained model or server is built once). Some pytest/xdist pairs silently stop
grouping; then this fails instead of the suite quietly taking minutes longer."""

from __future__ import annotations

import subprocess
import sys

PROBE = '''
import os, pathlib, pytest
pytestmark = pytest.mark.xdist_group("together")
@pytest.mark.parametrize("i", range(6))
def test_worker(i):
    pathlib.Path(__file__).with_name(f"ran-{i}").write_text(os.environ["PYTEST_XDIST_WORKER"])
'''


def test_an_xdist_group_runs_on_one_worker(tmp_path):
    (tmp_path / "test_probe.py").write_text(PROBE)
    done = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup",
                           "-p", "no:cacheprovider", "-q", str(tmp_path / "test_probe.py")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    workers = {p.read_text() for p in tmp_path.glob("ran-*")}
    assert done.returncode == 0 and len(list(tmp_path.glob("ran-*"))) == 6, done.stdout + done.stderr
    assert len(workers) == 1, f"the group ran on {sorted(workers)}: xdist no longer groups"
