"""A multi-MB record tokenizes in bounded time and memory (issue 8: one 50 MB record took 14 GB RSS when
the whole text was tokenized before truncation) and keeps the tokens the whole text would give."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tiny import minilm_tokenizer, tiny_backbone, user

from dmoerm.modeling.backbone import CHARS_PER_TOKEN, render_context

TESTS = Path(__file__).resolve().parents[1]


def _words(n: int, seed: int = 0) -> str:
    return " ".join(f"w{(i * 7919 + seed) % 997}x" for i in range(n))


def _whole_text_row(bb, context: str, response: str | None) -> tuple[list[int], int, int]:
    """(kept ids, context dropped, response dropped) as tokenize computes them from the whole texts."""
    tok = minilm_tokenizer()
    c = tok(render_context(user(context)), add_special_tokens=False)["input_ids"]
    head, mid, tail = bb.special_ids()
    if response is None:
        kept = c[len(c) - (bb.max_length - len(head) - len(tail)):]
        return head + kept + tail, len(c) - len(kept), 0
    r = tok(response, add_special_tokens=False)["input_ids"]
    budget = bb.max_length - len(head) - len(mid) - len(tail)
    kept_r = r[: budget - min(len(c), budget // 4)]
    kept = c[len(c) - (budget - len(kept_r)):]
    return head + kept + mid + kept_r + tail, len(c) - len(kept), len(r) - len(kept_r)


def test_a_long_text_keeps_the_whole_texts_tokens_and_estimates_what_it_dropped():
    bb = tiny_backbone("bert", max_length=64)
    context, response = "first words " + _words(20_000) + " the final question?", "alpha beta " + _words(20_000, 5)
    assert len(context) > 20 * bb.max_length * CHARS_PER_TOKEN  # far past the character cut
    for resp in (response, None):
        row = bb.tokenize([user(context)], [resp])[0]
        ids, c_dropped, r_dropped = _whole_text_row(bb, context, resp)
        assert row.ids == ids  # the same kept tokens as tokenizing the whole text
        assert abs(row.context_dropped - c_dropped) <= 0.05 * c_dropped
        assert abs(row.response_dropped - r_dropped) <= 0.05 * max(r_dropped, 1)
    text = minilm_tokenizer().decode(bb.tokenize([user(context)], [response])[0].ids)
    assert "final question" in text and "alpha beta" in text


def test_a_multi_mb_record_matches_a_modestly_pre_cut_one():
    bb = tiny_backbone("bert", max_length=64)
    words = _words(600_000)  # about 3.5 MB
    context, response = words + " and so?", "yes: " + words
    cut_context = context[context.index(" ", len(context) - 20_000):]  # 20k characters, at a word
    cut_response = response[: response.rindex(" ", 0, 20_000)]
    long_row = bb.tokenize([user(context)], [response])[0]
    short_row = bb.tokenize([user(cut_context)], [cut_response])[0]
    assert long_row.ids == short_row.ids and long_row.context_end == short_row.context_end
    assert long_row.context_dropped > 100 * short_row.context_dropped > 0  # counts what the cut removed


def test_normal_texts_are_tokenized_as_before():
    bb = tiny_backbone("bert", max_length=64)
    for context, response in (("hi", "yo"), (_words(300), _words(300, 3))):  # under / over max_length tokens
        assert len(context) < bb.max_length * CHARS_PER_TOKEN
        row = bb.tokenize([user(context)], [response])[0]
        assert (row.ids, row.context_dropped, row.response_dropped) == _whole_text_row(bb, context, response)


PROBE = """
import json, resource, sys, time
from tiny import tiny_backbone, user
bb = tiny_backbone("bert", max_length=512)
words = " ".join(f"w{(i * 7919) % 997}x" for i in range(int(sys.argv[1])))
context, response = user(words + " and so?"), "yes: " + words
bb.tokenize([user("warm up")], ["ok"])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
row = bb.tokenize([context], [response])[0]
seconds = time.perf_counter() - start
grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(json.dumps({"mb": len(words) / 1e6, "seconds": seconds, "rss_growth_mb": grown_mb, "n": len(row.ids)}))
"""


def test_a_multi_mb_record_tokenizes_in_bounded_time_and_memory():
    """In a fresh process, so the peak RSS is this tokenize call's: before the cut, 2 x 6 MB of text took
    about 1.4 GB and 15 s here."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", PROBE, "1000000"], capture_output=True, text=True, env=env,
                         timeout=600, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["mb"] > 5 and result["n"] == 512
    assert result["rss_growth_mb"] < 200, result
    assert result["seconds"] < 5, result
