"""The seed papers' experiments as one-command studies (``dmoerm study <name>``).

Each study is a Ray job under ``jobs/`` over a Ray-free library module here. :data:`STUDIES` is what the
CLI's ``study`` subcommand offers: name -> (one-line help, the job module it runs). A study's job module
has ``main(argv) -> int`` taking ``--config FILE`` and dotted overrides.
"""

from __future__ import annotations

from typing import NamedTuple


class Study(NamedTuple):
    help: str
    job: str
    """The Ray job module (``jobs.<verb_noun>``) that ``dmoerm study <name>`` runs in-process."""


STUDIES: dict[str, Study] = {
    "bon": Study("best-of-N: gold and proxy reward of each reward model's pick against KL (configs/study_bon.yaml)",
                 "jobs.study_bon"),
    "scaling": Study("data scaling: held-out accuracy of DMoERM and the single RM by fraction of the training data "
                     "and number of categories, a Ray Tune grid (configs/study_scaling.yaml)", "tuning.study_scaling"),
}
