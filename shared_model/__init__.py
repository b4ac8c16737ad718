"""TME-PSR model, data and metrics (torch + numpy; no Flower, no network I/O)."""
