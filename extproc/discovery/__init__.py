"""Discovery providers: where the pod set comes from (a static file, or the Kubernetes API)."""
