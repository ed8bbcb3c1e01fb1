"""Private subsystem of twinkle_dask."""
