"""actstore.ingest."""
