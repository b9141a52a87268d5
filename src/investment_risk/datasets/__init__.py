"""Data in: readers and validation, the synthetic corpus, the de-duplicated split."""
