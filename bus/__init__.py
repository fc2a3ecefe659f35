"""Durable pub/sub: ZeroMQ for the fast path, a SQLite journal for the truth.

- ``message``  the wire envelope and its validation
- ``journal``  the SQLite outbox, cursors, dead letters, backlog and pruning
- ``topology`` which process consumes which stream, and where each one listens
- ``node``     a process's sockets: publish (commit, then send) and consume (drain the journal)
"""

from trinity.bus.journal import Journal, Transaction
from trinity.bus.message import Message
from trinity.bus.node import BusNode
from trinity.contract import TOPOLOGY, Topology

__all__ = ["TOPOLOGY", "BusNode", "Journal", "Message", "Topology", "Transaction"]
