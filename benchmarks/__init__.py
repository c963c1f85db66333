"""Benchmarks of dag-safety against its peers; run each as a module from the repo root, e.g.
`python -m benchmarks.erase` (`benchmarks/RESULTS.md` holds the results and the commands)."""
