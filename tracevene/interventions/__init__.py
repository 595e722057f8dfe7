"""Intervention modules and the registry that saves them by name."""
