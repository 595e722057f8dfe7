"""Compatibility seams over peer libraries' private internals (one module per library)."""
