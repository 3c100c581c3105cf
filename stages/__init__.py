"""The split-learning applications: model definitions, partitioning and data."""
