"""The edge's logic, below the routes: the server client, the job runner, the cycle's
stages, the local model registry, inference, and the Prometheus metrics."""
