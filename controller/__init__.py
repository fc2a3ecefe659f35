"""The controller: issues events on a compressible clock, watches heartbeats and
process exits, raises alerts, and drives supervisord."""
