"""Benchmarks that score a trained model; each takes a plain answer function so it stays model-agnostic."""
