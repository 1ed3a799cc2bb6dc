"""The judge's pairwise question for one capability, its cache key, and the parsing of its answer."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Literal

from dmoerm.data.records import Turn

Verdict = Literal["A", "B"]

SYSTEM_PROMPT = (
    "You are an impartial judge comparing two AI assistant responses to the same conversation. "
    "Judge only the one capability you are asked about and ignore every other quality of the responses. "
    "Do not let the order of the responses or their length influence you. "
    'Answer with exactly one letter: "A" or "B".'
)


def build_messages(context: list[Turn], response_a: str, response_b: str, capability: str,
                   description: str = "") -> list[dict[str, str]]:
    """The pairwise question of the paper for one capability, as chat messages."""
    conversation = "\n".join(f"{t.role.capitalize()}: {t.content}" for t in context)
    aspect = f"{capability}: {description}" if description else capability
    user = (f"[Conversation]\n{conversation}\n[End of Conversation]\n\n"
            f"[Response A]\n{response_a}\n[End of Response A]\n\n"
            f"[Response B]\n{response_b}\n[End of Response B]\n\n"
            f"Which response is better with respect to {aspect}?\n"
            f'Answer with exactly "A" or "B".')
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def question_sha256(messages: list[dict[str, str]]) -> str:
    """sha256 of the exact question text (all messages): the cache key besides model and order."""
    text = json.dumps(messages, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


_VERDICT_RE = re.compile(
    r"^(?:(?:the\s+)?(?:final\s+)?(?:answer|verdict|choice|better\s+response)(?:\s+is)?\s*:?\s*)?"
    r"(?:(?:response|option|assistant)\s+)?([ab])(?:\s+is\s+better)?$",
    re.IGNORECASE,
)


def parse_verdict(text: str | None) -> Verdict | None:
    """``"A"`` or ``"B"`` from a judge reply ("A", "Response B", "**A**", "B.", "Answer: A").

    Anything else ("Both", "A or B", "", a truncated sentence) is an abstention: ``None``.
    """
    if not text:
        return None
    s = re.sub(r"[*_`\"'\[\]()]", "", text)
    s = re.sub(r"\s+", " ", s).strip().rstrip(".!:;,").strip()
    m = _VERDICT_RE.match(s)
    return None if m is None else m.group(1).upper()  # type: ignore[return-value]
