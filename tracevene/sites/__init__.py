"""The site vocabulary, per-architecture tables, and binding to hook points."""
