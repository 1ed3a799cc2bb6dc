"""Cluster definitions and their tools: the launcher config, KubeRay manifests, the image, ``render``
(the RayService's Serve config from serve/config.yaml), ``checks`` (what the tests assert of them),
``ssm_env`` (SSM parameters into a node's environment), ``cost`` (a run's GPU-hours)."""
