"""Operator commands: start, follow and resume a run, emit events, chaos, audit."""
