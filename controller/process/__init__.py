"""The controller process: events on a compressible clock, heartbeats, alerts, snapshots."""
