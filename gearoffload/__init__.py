"""gearoffload: Gearman on gevent, and a web layer that offloads slow work to workers."""

__version__ = "0.1.0"
