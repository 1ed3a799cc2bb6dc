"""DMoERM: double-layer mixture-of-experts reward models (arXiv 2403.01197).

The library is Ray-free (torch, transformers and peft) except ``dmoerm.submit``, which talks to a cluster
through Ray's job-submission client imported inside its functions. The Ray layers live at the repository
root and call into this package: ``jobs/`` (the pipeline job: ``dmoerm.pipeline``'s stage order on a Ray
executor), ``tuning/`` (the aggregator search on Ray Tune) and ``serve/`` (the reward server on Ray Serve).
"""

__version__ = "0.1.0"
