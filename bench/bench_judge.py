"""Judge labeling throughput: concurrency C in {8, 16} versus sequential (C=1) on the same questions.

The judge is tests/fake_judge.py in its own process (like a remote judge: it does not share the GIL with
the client) answering every question after a fixed latency. Each run starts from a fresh cache, so every
question is asked; concurrent runs are repeated and the median kept. Target: speedup >= 0.7 * C.
The last line printed is one JSON object of figures.

    python bench/bench_judge.py [--latency 0.05] [--samples 5] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dmoerm.data.records import Sample, Turn
from dmoerm.labeling import JudgeConfig, label_samples

REPO = Path(__file__).resolve().parents[1]
CAPABILITIES = {"chat": ["conversational sense", "proactivity", "emotion expression", "empathy",
                         "content richness"]}


def make_samples(num_samples: int) -> list[Sample]:
    """``num_samples`` samples of 4 responses: 6 pairs x 5 capabilities x 2 orders = 60 questions each."""
    return [Sample(id=f"bench:{k}", context=[Turn("user", f"Tell me about topic {k}.")],
                   responses=[f"answer {r} " * (r + 1) for r in range(4)], ranks=[4, 3, 2, 1],
                   category="chat")
            for k in range(num_samples)]


def time_run(url: str, concurrency: int, num_samples: int, workdir: Path, run: int = 0) -> tuple[float, int]:
    samples = make_samples(num_samples)
    cfg = JudgeConfig(base_url=url, model="fake-judge", concurrency=concurrency,
                      cache_path=str(workdir / f"cache-c{concurrency}-{run}"))
    start = time.perf_counter()
    report = label_samples(samples, CAPABILITIES, cfg, progress=False)
    elapsed = time.perf_counter() - start
    if report.asked != report.questions_total or report.consistent != report.questions_total // 2:
        raise RuntimeError(f"unexpected labeling result at C={concurrency}: {report}")
    return elapsed, report.questions_total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.05, help="judge latency per answer (s)")
    parser.add_argument("--samples", type=int, default=5, help="samples of 60 questions each")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per concurrency (median kept)")
    args = parser.parse_args()

    server = subprocess.Popen([sys.executable, str(REPO / "tests" / "fake_judge.py"),
                               "--latency", str(args.latency)], stdout=subprocess.PIPE, text=True)
    try:
        first = server.stdout.readline().split() if server.stdout else []
        if len(first) != 2 or first[0] != "PORT":
            raise RuntimeError(f"fake judge did not start (said {first!r})")
        url = f"http://127.0.0.1:{first[1]}/v1"
        figures: dict[str, float | int] = {"latency_s": args.latency, "cpus": os.cpu_count() or 0,
                                           "load_avg_1m": round(os.getloadavg()[0], 2)}
        with tempfile.TemporaryDirectory() as tmp:
            seq_s, questions = time_run(url, 1, args.samples, Path(tmp))
            figures.update(questions=questions, seq_s=round(seq_s, 3))
            for c in (8, 16):  # the median of a few runs: the machine is shared, one run can be unlucky
                runs = sorted(time_run(url, c, args.samples, Path(tmp), k)[0] for k in range(args.repeats))
                c_s = statistics.median(runs)
                figures[f"c{c}_best_s"] = round(runs[0], 3)
                speedup = seq_s / c_s
                figures.update({f"c{c}_s": round(c_s, 3), f"speedup_c{c}": round(speedup, 2),
                                f"speedup_c{c}_over_c": round(speedup / c, 3)})
                print(f"C={c:2d}: {c_s:.2f}s vs sequential {seq_s:.2f}s -> {speedup:.1f}x "
                      f"({speedup / c:.0%} of ideal; target 70%)", file=sys.stderr)
        figures["target_met"] = all(figures[f"speedup_c{c}_over_c"] >= 0.7 for c in (8, 16))
    finally:
        server.kill()
        server.wait()
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
