"""actstore.analysis."""
