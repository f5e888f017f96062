"""Federated planning: site fingerprint summaries, merging, and the federated experiment planner."""
