"""Tests of the edge agent (edge_service)."""
