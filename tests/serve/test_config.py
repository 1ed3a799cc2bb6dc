"""serve/config.yaml is a valid Ray Serve config whose deployments match the app's code defaults, so
`serve run serve/config.yaml` and `serve run serve.app:build_app` deploy the same thing."""

from __future__ import annotations

import sys

import pytest
import yaml
from serve_fixtures import REPO

sys.path.insert(0, str(REPO))


def test_config_validates_and_matches_the_code_defaults():
    from ray.serve.schema import ServeDeploySchema

    from serve import app

    cfg = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(cfg)
    (application,) = schema.applications
    assert application.import_path == "serve.app:build_app"
    app.AppArgs.model_validate(application.args)  # the args are the builder's
    code = {d.name: d for d in (app.Ingress, app.Router, app.AdapterPool)}
    for dep in application.deployments:
        d = code[dep.name]
        for key in ("max_ongoing_requests", "health_check_period_s", "health_check_timeout_s"):
            value = getattr(dep, key)
            if isinstance(value, (int, float)):
                assert value == getattr(d._deployment_config, key), (dep.name, key)
        assert dep.ray_actor_options.num_cpus == d.ray_actor_options["num_cpus"], dep.name
        want, have = dep.autoscaling_config, d._deployment_config.autoscaling_config
        for key in ("min_replicas", "max_replicas", "target_ongoing_requests", "upscale_delay_s", "downscale_delay_s"):
            assert want[key] == getattr(have, key), (dep.name, key)


def test_bad_app_args_are_refused_with_the_field():
    from pydantic import ValidationError

    from serve import app

    with pytest.raises(ValidationError, match="max_batch_tokens"):
        app.AppArgs.model_validate({"model": "x", "max_batch_tokens": 1})
    with pytest.raises(ValidationError, match="modle"):
        app.AppArgs.model_validate({"model": "x", "modle": "y"})
