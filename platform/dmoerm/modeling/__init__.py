"""Backbone split into a shared frozen trunk and trainable top stacks; router, experts, aggregator."""
