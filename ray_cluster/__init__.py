"""Cluster clients: the embedded local Ray head (`local`) and KubeRay on Kubernetes (`kuberay`)."""
