"""Pieces of the tune stage (medfusion.tune): search spaces, and what a finished sweep reports."""
