"""gearoffload-server: a wire-compatible Gearman job server on gevent.

Layers: ``state`` (jobs, queues, workers; no I/O), ``admin`` (text protocol over the same
state), ``server`` (the gevent I/O shell), ``config`` (the CLI's frozen settings).
"""
