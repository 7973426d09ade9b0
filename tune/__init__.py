"""The hyperparameter search: python -m tune.search."""
