"""Rebuild data/hh-rlhf-demo/ from the hh-rlhf test splits (MIT) beside the checkout.

A seeded, order-independent choice of raw lines, copied byte for byte (only the selection is ours):
    python scripts/vendor_hh_demo.py ../shared/data/hh-rlhf
"""

from __future__ import annotations

import gzip
import hashlib
import sys
from pathlib import Path

PER_CATEGORY = 1000
HELPFUL = ("helpful-base", "helpful-online", "helpful-rejection-sampled")


def pick(lines: list[bytes], n: int, salt: str) -> list[bytes]:
    keyed = sorted(lines, key=lambda b: hashlib.sha1(salt.encode() + b).hexdigest())
    return keyed[:n]


def main(src: Path, dst: Path) -> None:
    def read(split: str) -> list[bytes]:
        with gzip.open(src / split / "test.jsonl.gz", "rb") as f:
            return [line for line in f.read().splitlines() if line.strip()]

    helpful = [line for i, s in enumerate(HELPFUL)
               for line in pick(read(s), PER_CATEGORY // 3 + (i < PER_CATEGORY % 3), s)]
    harmless = pick(read("harmless-base"), PER_CATEGORY, "harmless-base")
    for name, lines in (("helpful.jsonl.gz", helpful), ("harmless-base.jsonl.gz", harmless)):
        with gzip.GzipFile(dst / name, "wb", mtime=0) as f:
            f.write(b"\n".join(lines) + b"\n")
        print(name, len(lines))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(__file__).resolve().parents[1] / "data" / "hh-rlhf-demo")
