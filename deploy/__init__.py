"""Kubernetes manifests for a Bytewax cluster and the ingestion API (`gatewatch deploy
render`, see deploy/README.md); pure functions from options to YAML documents.
"""
