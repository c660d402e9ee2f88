"""Micro-benchmarks of the gateway's hot paths (`python -m bench.<name>`)."""
