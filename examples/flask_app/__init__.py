"""The example Flask app (``webapp.py``) and its one-command demo (``demo.py``).

``examples.flask_app:app`` is the app (imported lazily, so that ``python -m
examples.flask_app.demo`` can monkey-patch before anything else is imported)::

    gearoffload-worker --wsgi examples.flask_app:app --servers 127.0.0.1:4730
"""

from typing import Any


def __getattr__(name: str) -> Any:
    if name in ("app", "legacy_app", "fibonacci"):
        from . import webapp

        return getattr(webapp, name)
    raise AttributeError(f"module 'examples.flask_app' has no attribute {name!r}")
