"""Training scripts that reproduce the shipped weights (``python -m diffusiongym.train.digits``)."""
