"""Evaluation: the competition metric, mask matching and encoding, submissions, the scorer, the report."""
