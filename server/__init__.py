"""Server side of tme-psr: aggregation of the shared model parts (see DESIGN.md section 7)."""
