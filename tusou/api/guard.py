"""Guards against one tenant taking the server from the others (issue 10), at the HTTP layer.

:class:`TenantSlots`: requests that process images (new, add, search) run on a few shared threads
(``Settings.heavy_threads``); one access key may hold at most ``heavy_per_tenant`` of them at once. Its
other requests wait without holding a thread, so a tenant sending many slow-URL requests cannot fill every
heavy thread while another tenant's inline images wait.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio


class TenantSlots:
    """Per-tenant caps on concurrent work, waited for asynchronously. Memory: one entry per tenant with a
    request in flight."""

    def __init__(self, per_tenant: int) -> None:
        self.per_tenant = max(1, per_tenant)
        self._limiters: dict[str, anyio.CapacityLimiter] = {}
        self._users: dict[str, int] = {}

    @asynccontextmanager
    async def hold(self, tenant: str) -> AsyncIterator[None]:
        limiter = self._limiters.get(tenant)
        if limiter is None:
            limiter = self._limiters[tenant] = anyio.CapacityLimiter(self.per_tenant)
        self._users[tenant] = self._users.get(tenant, 0) + 1
        try:
            async with limiter:
                yield
        finally:
            self._users[tenant] -= 1
            if not self._users[tenant]:
                del self._users[tenant], self._limiters[tenant]
