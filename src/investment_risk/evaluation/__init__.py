"""Evaluation: a model against labelled data beside the mean baseline, and two runs compared."""
