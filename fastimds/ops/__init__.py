"""What operators read: telemetry counters and the scrape, the event log, the request log."""
