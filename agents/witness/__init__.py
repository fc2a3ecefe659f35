"""WITNESS: pattern detection that learns (the process, its detector and its store)."""
