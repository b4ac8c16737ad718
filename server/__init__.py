"""Server side of tme-psr: aggregation of the shared model parts."""
