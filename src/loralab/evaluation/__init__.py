"""Evaluation: token NLL, the expert x domain check."""
