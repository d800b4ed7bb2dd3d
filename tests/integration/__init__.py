"""Integration tests: real server and edge processes on loopback."""
