"""Deployment tests: docker/ (Dockerfiles, compose, Prometheus, Grafana) checked without a Docker engine."""
