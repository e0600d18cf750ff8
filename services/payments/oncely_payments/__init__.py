"""The oncely reference payments service: a FastAPI API where every payment takes effect once.

    python -m oncely_payments --store sqlite:payments.db --port 8000     # docs at /docs

Only oncely's public names are used (``oncely`` and ``oncely.asgi``): the service is a user of
the library like any other.
"""

from __future__ import annotations

from .app import Service, create_app
from .settings import Settings

__all__ = ["Service", "Settings", "create_app"]
