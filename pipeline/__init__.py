"""Featurise very large image collections and whole-slide images with CLIP-family models on Ray."""

__version__ = "0.1.0"
