"""Synthetic tasks the recipes and tests use: data, labels and scores.

- ``tracevene.tasks.hierarchical_equality``: (w == x) == (y == z), for DAS.
- ``tracevene.tasks.induction``: repeated random sequences, for induction heads.
- ``tracevene.tasks.ioi``: indirect object identification (Wang et al. 2023).

Datasets and scores only: model classes and their training are in
``tracevene.models`` (``tracevene.models.equality`` for hierarchical equality).
"""
