"""Fakes of outside services, for tests: each a small real server."""
