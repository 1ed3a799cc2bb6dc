"""Print ``export NAME=value`` lines for the SSM parameters under a prefix, for a node's start command:

    SECRETS="$(python -m cluster.ssm_env --prefix /dmoerm/)" && eval "$SECRETS" && ray start ...

(not ``eval "$(...)"`` alone: its status is eval's, 0 even when reading the parameters failed).

Each parameter ``<prefix><NAME>`` (SecureString, decrypted) becomes the variable ``NAME`` in the shell that
starts Ray, so Ray's processes and the jobs inherit it and nothing is written to disk. The node's
instance profile must allow ``ssm:GetParametersByPath`` on the prefix (and ``kms:Decrypt``). A parameter
whose last path part is not a valid variable name is refused, not skipped. Values never go to stderr.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys

NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def read_parameters(prefix: str, client=None) -> dict[str, str]:
    """The decrypted parameters directly under ``prefix``, by their last path part."""
    import boto3

    client = client or boto3.client("ssm")
    out: dict[str, str] = {}
    for page in client.get_paginator("get_parameters_by_path").paginate(Path=prefix, WithDecryption=True,
                                                                        Recursive=False):
        for p in page["Parameters"]:
            name = p["Name"].rsplit("/", 1)[-1]
            if not NAME.match(name):
                raise ValueError(f"SSM parameter {p['Name']!r}: {name!r} is not an environment variable name")
            out[name] = p["Value"]
    return out


def export_lines(values: dict[str, str]) -> str:
    return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in sorted(values.items()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prefix", default="/dmoerm/", help="SSM path holding one parameter per variable")
    p.add_argument("--require", nargs="*", default=["RAY_AUTH_TOKEN"], help="fail unless these are present")
    args = p.parse_args(argv)
    prefix = args.prefix if args.prefix.endswith("/") else args.prefix + "/"
    try:
        values = read_parameters(prefix)
    except Exception as e:  # boto3's errors name the parameter path, never a value
        print(f"cluster.ssm_env: cannot read SSM parameters under {prefix}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    missing = [n for n in args.require if n not in values]
    if missing:
        print(f"cluster.ssm_env: missing under {prefix}: {', '.join(missing)}", file=sys.stderr)
        return 2
    sys.stdout.write(export_lines(values))
    print(f"cluster.ssm_env: exported {', '.join(sorted(values))}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
