"""Trinity's stores: each module owns one store's tables, their schema and every query on them.

- ``journal``   the bus's journal (``trinity_messages.db``): messages, streams, cursors,
                dead letters
- ``runs``      what a run records beside the bus, in the same file: runs, events,
                outcomes, snapshots written, agents' last heartbeats, emitted events
- ``costs``     the cost ledger (``trinity_costs.db``): one row per model call attempt
- ``patterns``  the pattern store (``trinity_patterns.db``): exemplars, detections,
                per-pattern counts; ``patterns.firestore`` keeps the same record in
                Firestore (``TRINITY_PATTERN_BACKEND``)
- ``run_logs``  the per-process run logs a run writes under ``logs/``
- ``schema``    the generator: renders each store's SQLAlchemy declaration to the DDL
                and column list the store carries (``make schema``)
"""
