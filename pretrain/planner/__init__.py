"""Will it fit, and how fast: per-GPU memory and step time of a layout, computed (memory.py,
timing.py, suggest.py) and simulated at full size on one CPU (dry_run.py)."""
