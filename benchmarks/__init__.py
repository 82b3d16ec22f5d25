"""Benchmarks of fmt_hf: the code behind scripts/bench_*.py and scripts/check_gpu.py."""
