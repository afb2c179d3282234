"""Checkpoint and Hub I/O: reading sources, writing outputs safely, publishing."""
