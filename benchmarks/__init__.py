"""The benchmarks users run: `instdisc bench bank|train|defaults` print numbers,
`instdisc scale bank|train|data` sweep and write results.parquet, results.md and plots.
They drive the service from outside, as separate processes, so `bank_server` carries
none of this code. Results: BENCHMARKS.md beside this file."""
