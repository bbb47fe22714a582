"""Benchmarks and scaling sweeps of the memory bank and of training with it:
`instdisc bench bank`, `instdisc bench train`, `instdisc scale bank` and
`instdisc scale train`. They drive the service from outside, as separate processes,
so the service itself (`bank_server`) carries none of this code. Results and plots:
BENCHMARKS.md beside this file.
"""
