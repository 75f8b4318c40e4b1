"""Leaf helpers every part may use (imports nothing else from the package): atomic writes,
derived seeds, progress reporting."""
