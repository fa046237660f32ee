"""The modelseal key server (``pip install modelseal[keyserver]``); see docs/spec/keyserver-v1.md.

Layers: ``routes`` (HTTP) → ``services`` (domain logic, raising :class:`DomainError`) →
``repository`` (SQLAlchemy Core, units of work). This package imports the core library, never the
reverse, and importing it pulls in no web or database stack: build an app with
:func:`modelseal.keyserver.app.create_app`.
"""

from __future__ import annotations
