"""Helpers with no domain knowledge: atomic writes, shards, the worker pool, logging, timings."""
