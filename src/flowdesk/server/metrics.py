"""``GET /metrics``: the app's Prometheus metrics, in the text exposition format.

Who may scrape is the server's choice (``create_app(metrics_access=...)``, ``flowdesk
serve --metrics-access``):

* ``local`` (default): clients on the loopback interface scrape without a token (a
  Prometheus or agent on the same machine); any other client needs a bearer token whose
  user may read runs (``runs:read``). Behind a reverse proxy on the same machine every
  client looks local: use ``token`` there.
* ``open``: anyone who reaches the server;
* ``token``: a bearer token with ``runs:read``, always (Prometheus ``authorization``).
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, Any, Literal, get_args

from fastapi import APIRouter, Request, Response, Security
from fastapi.security import HTTPAuthorizationCredentials

from flowdesk import errors, observe
from flowdesk.governance import identity as ident
from flowdesk.observe import metrics as metrics_mod
from flowdesk.server import api

MetricsAccess = Literal["local", "open", "token"]
ACCESS: tuple[str, ...] = get_args(MetricsAccess)

router = APIRouter()


def check_access(value: str) -> MetricsAccess:
    if value not in ACCESS:
        raise errors.ConfigurationError(
            f"Unknown metrics access {value!r}: use {', '.join(ACCESS)}."
        )
    return value  # type: ignore[return-value]


def _loopback(request: Request) -> bool:
    host = request.client.host if request.client is not None else ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class PrometheusResponse(Response):
    media_type = metrics_mod.CONTENT_TYPE


_TEXT: dict[str, Any] = {"schema": {"type": "string"}}


@router.get(
    "/metrics",
    response_class=PrometheusResponse,
    responses={
        200: {
            "description": "Every metric of the app, in the Prometheus text format.",
            "content": {"text/plain": _TEXT},
        },
        **api.errs(*api.AUTH, explicit=True),
    },
    tags=["observability"],
    summary="Prometheus metrics",
)
async def metrics(
    request: Request,
    svc: api.Svc,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(api.bearer)],
) -> PrometheusResponse:
    access: MetricsAccess = getattr(request.app.state, "metrics_access", "local")
    if access == "token" or (access == "local" and not _loopback(request)):
        user = await svc.identity.authenticate(
            None if credentials is None else credentials.credentials
        )
        ident.require(user, "runs:read")
    body = await observe.metrics_of(svc.app).render()
    return PrometheusResponse(body)
