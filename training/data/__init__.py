"""Datasets: offline readers and the preparation of the local copies."""
