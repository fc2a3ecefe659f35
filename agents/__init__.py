"""The agent processes: WITNESS, ARCHITECT and EXECUTOR, on a shared base."""
