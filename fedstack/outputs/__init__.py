"""What a run leaves behind: its directory, history, checkpoints, plots and summary."""
