"""Kubernetes: API client and watches, the HTTPRoute controller and its Lease."""
