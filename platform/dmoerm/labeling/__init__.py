"""Capability labels: an LLM judge (swap-consistent pairwise verdicts), rating columns, or human ranks.

Nothing heavy happens at import: httpx and tqdm are imported when a judge is called.
"""

from dmoerm.labeling.attributes import labels_from_attributes, load_attribute_ratings
from dmoerm.labeling.dataset import labels_from_dataset
from dmoerm.labeling.judge import (
    JudgeClient,
    JudgeConfig,
    JudgeError,
    LabelReport,
    judge_pair,
    label_samples,
    label_samples_async,
)
from dmoerm.labeling.prompts import build_messages, parse_verdict

__all__ = [
    "JudgeClient",
    "JudgeConfig",
    "JudgeError",
    "LabelReport",
    "build_messages",
    "judge_pair",
    "label_samples",
    "label_samples_async",
    "labels_from_attributes",
    "labels_from_dataset",
    "load_attribute_ratings",
    "parse_verdict",
]
