"""Fault handling beside the training loop: the hang watchdog (watchdog.py)."""
