"""Hardening tests (issue #7): authorization, fuzzing, hostile input, crashes, load."""
