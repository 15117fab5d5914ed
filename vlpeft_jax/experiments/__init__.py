"""End-to-end experiments driven by configs (``run.py train --config configs/X.py``)."""
