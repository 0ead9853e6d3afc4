"""Trajectories: the one schema shared by production logs, rollouts and training data."""
