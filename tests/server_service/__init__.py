"""Tests of the training-cycle server (server_service)."""
