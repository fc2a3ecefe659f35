"""Durable pub/sub: ZeroMQ for the fast path, a SQLite journal for the truth.

The bus knows no process names: which streams exist and who consumes them is the
:class:`~trinity.contract.Topology` a node is given.

- ``config``   what the bus needs from the settings: endpoints, limits, keys
- ``message``  the wire envelope and its validation
- ``journal``  the SQLite outbox, cursors, dead letters, backlog and pruning (its
               tables and statements are ``trinity.stores.journal``'s)
- ``node``     a process's sockets: publish (commit, then send) and consume (drain the journal)
- ``curve``    ZeroMQ CURVE: one key pair per process, a ZAP handler per socket
- ``process``  a process on the bus: the kernel lifecycle plus a journal and a node
"""

from trinity.bus.journal import Journal, Transaction
from trinity.bus.message import Message
from trinity.bus.node import BusNode
from trinity.contract import Topology

__all__ = ["BusNode", "Journal", "Message", "Topology", "Transaction"]
