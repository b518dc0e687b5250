"""Test helpers shared across the suite: tiny locally built models and their TransformerLens twins."""
