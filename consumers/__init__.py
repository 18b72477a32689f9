"""Consumers: the filter group scores raw groups and routes them to curated or the dead-letter topic."""
