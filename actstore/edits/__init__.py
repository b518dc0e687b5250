"""actstore.edits."""
