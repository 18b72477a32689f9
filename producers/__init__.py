"""Producers: searchers and external generators publish TrajectoryGroups to the raw topic."""
