"""Redis server fixtures (being written)."""
