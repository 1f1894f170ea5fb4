import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
DATA = os.path.join(ROOT, "data")


def session_ray():
    """The session's real local Ray cluster (2 CPUs), started on first use and shut down when pytest ends:
    one start-up (~9 s here) instead of one per test module."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 object_store_memory=200 * 1024 * 1024)
    return ray


@pytest.fixture(scope="module")
def ray_local():
    """The session's local Ray cluster, for a test module."""
    return session_ray()


@pytest.fixture
def no_session_ray():
    """For tests that connect this process to a cluster of their own (`ray.cluster_utils`)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def pytest_sessionfinish(session, exitstatus):
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def cli(*args: str, timeout: int = 300, **kw):
    """Run `python -m ...` from the repository root with this interpreter."""
    import subprocess

    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, **kw)
