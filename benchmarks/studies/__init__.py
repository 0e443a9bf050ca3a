"""Study definitions for benchmarks/run.py: each module lists its runs, runs one, and summarises."""
