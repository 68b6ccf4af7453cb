"""What the web tier and the workers share: settings, keys, the event log, the hub, jobs."""
