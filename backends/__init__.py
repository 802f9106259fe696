"""Inference engines: how to launch each one, check it, and what it serves."""
