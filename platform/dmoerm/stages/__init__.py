"""Pipeline stages as plain functions with idempotent, storage-backed outputs (Ray-free)."""
