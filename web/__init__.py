"""The web tier: the HTTP API, the event streams and the pages."""
