"""Agreement, statistics and benchmark scores."""
