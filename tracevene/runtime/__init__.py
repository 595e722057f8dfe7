"""The shared runtime that every engine runs on.

Planning, interpretation, inputs, events, the source cache, hook installation and the
eager-attention route. Engines (``tracevene.backends``) hold only engine code.
"""
