"""Admin routes for operators: projection state, parked events and the decision on them."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from litestar import get, post
from litestar.exceptions import NotFoundException
from litestar.params import FromPath, Parameter
from litestar.types import ControllerRouterHandler

from libs.projections.parking import decide, open_parked
from libs.runtime.platform import Platform


def operations_routes(platform: Platform) -> list[ControllerRouterHandler]:
    """``GET /api/admin/projections`` and ``POST .../parked/{seq}/{decision}``."""

    @get("/projections")
    async def projections() -> dict[str, Any]:
        """Each service's projections, their state and lag, and their open parked events."""
        _, detail = await platform.readiness()
        parked: dict[str, Any] = {}
        for name, runtime in platform.services.items():
            if runtime.pool is None:
                continue
            async with runtime.pool.acquire() as conn:
                parked[name] = [
                    {**row, "parked_at": row["parked_at"].isoformat()}
                    for row in await open_parked(conn)
                ]
        return {"services": detail.get("services", {}), "parked": parked}

    @post(
        "/projections/{service:str}/{projection:str}/parked/{seq:int}/{decision:str}",
        status_code=200,
    )
    async def decide_parked(
        service: FromPath[str],
        projection: FromPath[str],
        seq: Annotated[int, Parameter(ge=1, le=2**63 - 1, description="stream sequence")],
        decision: FromPath[Literal["skip", "retry"]],
    ) -> dict[str, Any]:
        """Skip a parked event (the projection moves past it) or retry it."""
        runtime = platform.services.get(service)
        if runtime is None:
            raise NotFoundException(f"no service {service!r} in this process")
        async with runtime.db().acquire() as conn:
            if not await decide(conn, projection, seq, decision):
                raise NotFoundException(f"no open parked event {projection}@{seq} in {service}")
        return {"service": service, "projection": projection, "seq": seq, "decision": decision}

    return [projections, decide_parked]
