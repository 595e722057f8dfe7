"""Backends: the interface (base.py), the reference torch backend, shared scheduling."""
