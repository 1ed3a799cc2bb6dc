from pathlib import Path

import pytest
from services import mlflow_server  # noqa: F401  (tests/ is on sys.path)


@pytest.fixture(scope="module")
def local_ray():
    """A fresh local Ray instance (2 CPUs) for one test module, its workers importing this checkout's
    ``jobs``/``tuning``; shut down after the module."""
    import ray

    repo = Path(__file__).resolve().parents[2]
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(repo)}})
    try:
        yield
    finally:
        ray.shutdown()
