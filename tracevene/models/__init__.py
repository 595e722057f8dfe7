"""Small models the recipes and tests train and load, with their training code.

- ``tracevene.models.equality``: ``EqualityMLP`` for the hierarchical equality task
  (``tracevene.tasks.hierarchical_equality``), and ``train_mlp``.

The task modules (``tracevene.tasks``) keep the data and the scores; the bundled
checkpoints and the scripts that make them are in the repository's ``models/`` folder.
"""
