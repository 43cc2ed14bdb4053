"""Tasks: the plug-in contract (`contract`, `plugin`), the built-in tasks that use it
(`builtin`: datasets, partitioning, models) and local training."""
