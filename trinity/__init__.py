"""Trinity: a supervised, multi-process autonomous-improvement loop.

The installed namespace maps the project's top-level folders:
``trinity.bus`` (bus/), ``trinity.agents`` (agents/), ``trinity.controller``
(controller/); this package holds what they all share.
"""

__version__ = "0.1.0"
