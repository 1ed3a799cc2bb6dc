"""The pipeline's stage bodies, Ray-free, each an idempotent function ``step(cfg, store, *keys) -> key``
whose outputs live in a ``StageStore``: ``data``, ``route``, ``labels``, ``train`` (trunk features, phase 1
and the baseline, one expert), ``phase3`` (expert features, the aggregator search, the aggregator) and
``evaluate``. ``dmoerm.pipeline`` orders them."""
