"""Security of the bus, the stores and the files a run writes (issue 8)."""
