"""Benchmarks for the featurisation pipeline (see BENCHMARKS.md). Not part of the installed package."""
