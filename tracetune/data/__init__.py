"""Data quality gates (Great Expectations) over trajectories flattened to derived columns."""
