"""actstore.queries."""
