"""The agent processes, each a BusProcess under supervisord.

- ``witness``      WITNESS: reads telemetry, detects the five patterns, learns exemplars
- ``architect``    ARCHITECT: turns signals into plans, each model call routed local or cloud
- ``executor``     EXECUTOR: runs a plan's tasks through the delegates
- ``delegates``    QualityEnforcer, AgencyCodeAgent and TestGenerator
- ``model_agent``  what ARCHITECT and EXECUTOR share: a model call prepared outside the
                   journal transaction, its outputs committed inside it
- ``models``       model providers, the routing policy and the router (no WITNESS import)
"""
