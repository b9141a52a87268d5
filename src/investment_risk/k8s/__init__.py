"""Kubernetes: manifests built in Python, the cluster client, and Jobs run here (run-local)."""
