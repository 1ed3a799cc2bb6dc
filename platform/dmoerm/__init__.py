"""DMoERM: double-layer mixture-of-experts reward models (arXiv 2403.01197).

The library is Ray-free: torch, transformers and peft only. Ray layers live in ``jobs/``, ``tuning/`` and
``serve/`` at the repository root and call into this package.
"""

__version__ = "0.1.0"
