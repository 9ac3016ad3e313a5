"""The copy benchmark of issue 11: `python -m bench` (bench/README.md)."""
