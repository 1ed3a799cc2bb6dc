"""Write the RayService's ``serveConfigV2`` from serve/config.yaml, so the manifest and the Serve config the
serving tests deploy cannot drift apart:

    python -m cluster.render            # rewrite the block in cluster/kuberay/rayservice.yaml
    python -m cluster.render --check    # exit 1 when the checked-in block differs (what a test asserts)

The rendered config is serve/config.yaml through ``serve.deploy.load_serve_config`` (the function the
serving tests and ``dmoerm serve`` use) with the cluster's overrides, :data:`CLUSTER_OVERRIDES`, and
nothing else: Serve listens on every interface inside its pods (the serve Service is ClusterIP), a proxy
runs on every node, the adapter pool takes one GPU, and the bearer token is required.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SERVE_CONFIG = REPO / "serve" / "config.yaml"
RAYSERVICE = REPO / "cluster" / "kuberay" / "rayservice.yaml"
BEGIN = "  # BEGIN serveConfigV2"
END = "  # END serveConfigV2"
HEADER = "  # BEGIN serveConfigV2 (written by `python -m cluster.render` from serve/config.yaml: edit that file)"

CLUSTER_OVERRIDES: dict = {
    "proxy_location": "EveryNode",
    "http": {"host": "0.0.0.0"},
    "args": {"require_auth": True},
    "deployments": {"AdapterPool": {"ray_actor_options": {"num_cpus": 4, "num_gpus": 1}}},
}
"""Every way the cluster's Serve config differs from serve/config.yaml (tests hold the rest equal)."""


def render_serve_config(path: str | Path = SERVE_CONFIG, overrides: dict | None = None) -> dict:
    """serve/config.yaml with the cluster's overrides, as a Serve config dict."""
    sys.path.insert(0, str(REPO))
    from serve.deploy import load_serve_config

    o = CLUSTER_OVERRIDES if overrides is None else overrides
    cfg = load_serve_config(path, args=o.get("args"), deployments=o.get("deployments"), http=o.get("http"))
    if "proxy_location" in o:
        cfg["proxy_location"] = o["proxy_location"]
    return cfg


def render_block(cfg: dict) -> str:
    """The manifest lines from BEGIN to END: ``serveConfigV2: |`` and the config, indented under it."""
    body = yaml.safe_dump(cfg, sort_keys=False, width=110)
    lines = [HEADER, "  serveConfigV2: |", *("    " + line if line else "" for line in body.splitlines()), END]
    return "\n".join(lines) + "\n"


def render_manifest(text: str, cfg: dict, where: str = "rayservice.yaml") -> str:
    """``text`` with its BEGIN..END block replaced by the rendered ``cfg``."""
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.startswith(BEGIN)]
    ends = [i for i, line in enumerate(lines) if line.startswith(END)]
    if len(starts) != 1 or len(ends) != 1 or ends[0] < starts[0]:
        raise ValueError(f"{where}: needs exactly one '{BEGIN.strip()}' line followed by one '{END.strip()}' line "
                         f"under spec (found {len(starts)} and {len(ends)})")
    return "".join(lines[: starts[0]]) + render_block(cfg) + "".join(lines[ends[0] + 1:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only compare; exit 1 on a difference")
    p.add_argument("--manifest", default=str(RAYSERVICE))
    args = p.parse_args(argv)
    path = Path(args.manifest)
    text = path.read_text()
    new = render_manifest(text, render_serve_config(), path.name)
    if new == text:
        print(f"{path}: serveConfigV2 is up to date with {SERVE_CONFIG.relative_to(REPO)}")
        return 0
    if args.check:
        print(f"{path}: serveConfigV2 differs from serve/config.yaml; run `python -m cluster.render`", file=sys.stderr)
        return 1
    path.write_text(new)
    print(f"{path}: serveConfigV2 rewritten from {SERVE_CONFIG.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
