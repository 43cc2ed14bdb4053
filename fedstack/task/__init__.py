"""Tasks: datasets, partitioning among clients, models and local training."""
