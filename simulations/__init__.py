"""Command-line entry points, benchmarks and reports."""
