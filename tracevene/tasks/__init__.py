"""Synthetic tasks the recipes and tests use: data, labels and scores.

- :mod:`tracevene.tasks.hierarchical_equality`: (w == x) == (y == z), for DAS.
- :mod:`tracevene.tasks.induction`: repeated random sequences, for induction heads.
- :mod:`tracevene.tasks.ioi`: indirect object identification (Wang et al. 2023).
"""
