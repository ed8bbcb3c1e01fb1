"""Runnable examples: ``python -m twinkle_dask.examples.train``."""
