"""The TCP proxy in front of a real PostgreSQL or Redis: it lives in the payments service's
package (``oncely_payments.store_proxy``), which the nemesis runs it from; the tests import it
from here."""

from oncely_payments.store_proxy import (
    GARBAGE,
    Mode,
    PostgresFrontend,
    RedisRequests,
    StoreProxy,
    Trap,
)

__all__ = ["GARBAGE", "Mode", "PostgresFrontend", "RedisRequests", "StoreProxy", "Trap"]
