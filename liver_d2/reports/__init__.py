"""Comparison reports of trained model variants."""
