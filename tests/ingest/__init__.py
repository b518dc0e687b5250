"""Tests of actstore.ingest."""
