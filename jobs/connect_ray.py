"""How every Ray entrypoint of this checkout (the pipeline job, the studies, candidate generation) joins Ray.

No secret ever goes into a ``runtime_env`` (Ray shows it in the job info): a local instance's workers
inherit this process's environment (secrets included) from the raylet it starts, so only PYTHONPATH is set;
a remote cluster gets the non-secret ``dmoerm.submit.forwarded_env`` and its nodes must hold the secrets.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import ray

from dmoerm.submit import forwarded_env, withheld_env

REPO = Path(__file__).resolve().parents[1]


def init_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Join the submitted job's cluster, or ``address``, or start a fresh local instance whose workers import
    ``jobs``/``tuning`` from this checkout (``address="local"``: never a cluster a ``ray start`` left on the
    machine). False when Ray is already up in this process (a test's, or the caller's)."""
    if ray.is_initialized():
        return False
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:  # a submitted job: its runtime env is set already
        ray.init(address=address or "auto")
    elif address:
        env = forwarded_env()
        withheld = withheld_env()
        if withheld:
            logging.getLogger(__name__).info("not forwarded to the cluster's workers (secrets; set them on its "
                                             "nodes): %s", ", ".join(withheld))
        ray.init(address=address, runtime_env={"env_vars": env} if env else None)
    else:
        path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                 runtime_env={"env_vars": {"PYTHONPATH": path}}, logging_level=logging.WARNING)
    return True
