"""The with-block front-end."""
