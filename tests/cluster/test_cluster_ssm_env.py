"""cluster/ssm_env.py, the launcher's way to give a node its secrets without files: the SSM parameters
under a prefix, read from moto's server over HTTP (real boto3 calls), become variables of the shell that
runs `eval "$(python -m cluster.ssm_env ...)"`, values with quotes and dollars intact."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TRICKY = "it's a \"quoted\" $HOME `value`"


@pytest.fixture
def ssm(s3_server, request):
    import boto3

    client = boto3.client("ssm", endpoint_url=s3_server.endpoint_url, region_name=s3_server.region,
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    prefix = f"/dmoerm-{request.node.name[-20:].strip('[]_')}/"
    return client, prefix


def _eval(prefix: str, *, echo: str, extra: str = "") -> subprocess.CompletedProcess:
    # the launcher's own form: the assignment carries the reader's exit status, so a failed read stops the chain
    script = (f'S="$({sys.executable} -m cluster.ssm_env --prefix {prefix} {extra})" && eval "$S" && '
              f'printf %s "${echo}"')
    return subprocess.run(["bash", "-c", script], cwd=REPO, capture_output=True, text=True, env={**os.environ})


def test_parameters_become_the_start_shells_environment(ssm):
    client, prefix = ssm
    client.put_parameter(Name=f"{prefix}RAY_AUTH_TOKEN", Value="tok-123", Type="SecureString")
    client.put_parameter(Name=f"{prefix}OPENAI_API_KEY", Value=TRICKY, Type="SecureString")
    out = _eval(prefix, echo="OPENAI_API_KEY")
    assert out.returncode == 0, out.stderr
    assert out.stdout == TRICKY
    assert "tok-123" not in out.stderr and "exported OPENAI_API_KEY, RAY_AUTH_TOKEN" in out.stderr
    assert _eval(prefix, echo="RAY_AUTH_TOKEN").stdout == "tok-123"


def test_a_missing_ray_token_fails_the_start(ssm):
    client, prefix = ssm
    client.put_parameter(Name=f"{prefix}HF_TOKEN", Value="hf", Type="SecureString")
    out = _eval(prefix, echo="HF_TOKEN")
    assert out.returncode == 2 and f"missing under {prefix}: RAY_AUTH_TOKEN" in out.stderr
    assert out.stdout == ""  # nothing after the failed read ran


def test_a_parameter_that_is_no_variable_name_is_refused(ssm):
    client, prefix = ssm
    client.put_parameter(Name=f"{prefix}RAY_AUTH_TOKEN", Value="t", Type="SecureString")
    client.put_parameter(Name=f"{prefix}bad-name", Value="x", Type="SecureString")
    out = subprocess.run([sys.executable, "-m", "cluster.ssm_env", "--prefix", prefix], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 2 and "'bad-name' is not an environment variable name" in out.stderr
