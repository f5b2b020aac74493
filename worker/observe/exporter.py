"""`GET /metrics`: the Prometheus text format, on `cascade api` and `cascade metrics`.

Behind a bearer token (METRICS_TOKEN, else API_TOKEN): the figures say how much a
business sends and to how many campaigns. A scrape that cannot read the database or
Redis answers 503 within seconds (worker.observe.gauges gives up fast), never half a picture.
"""

from __future__ import annotations

import hmac
import logging
from typing import Annotated

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST

from config import Settings, get_settings
from worker.observe import logs
from worker.observe.gauges import DatabaseCollector
from worker.observe.metrics import exposition

log = logging.getLogger(__name__)

bearer = HTTPBearer(
    auto_error=False,
    scheme_name="MetricsToken",
    description="METRICS_TOKEN (API_TOKEN when unset), as `Authorization: Bearer <token>`.",
)


def metrics_settings(request: Request) -> Settings:
    return getattr(request.app.state, "settings", None) or get_settings()


def metrics_token(settings: Settings) -> str:
    token = settings.metrics_token or settings.api_token
    return token.get_secret_value() if token else ""


def require_metrics_token(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    settings: Annotated[Settings, Depends(metrics_settings)],
) -> None:
    """Constant-time comparison; no token configured means nobody gets in."""
    expected = metrics_token(settings).encode()
    given = credentials.credentials.encode() if credentials else b""
    if not (expected and hmac.compare_digest(given, expected)):
        raise HTTPException(
            401,
            "missing or wrong token: send Authorization: Bearer <METRICS_TOKEN or API_TOKEN>",
            headers={"WWW-Authenticate": "Bearer"},
        )


router = APIRouter(tags=["monitoring"])


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    dependencies=[Depends(require_metrics_token)],
    response_class=Response,
    responses={
        200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "The text format."},
        401: {"description": "No bearer token, or not METRICS_TOKEN (API_TOKEN)."},
        503: {"description": "The database or Redis is unavailable; nothing is served."},
    },
)
def get_metrics(request: Request) -> Response:
    """The workers' counters and histograms, and gauges read from the database now."""
    settings = metrics_settings(request)
    database = getattr(request.app.state, "metrics_database", True)
    try:
        body = exposition(DatabaseCollector(settings, database=database))
    except Exception as exc:  # an outage: say so quickly, the next scrape tries again
        log.warning("metrics: scrape failed: %s", type(exc).__name__)
        return Response("metrics unavailable: the database or Redis is down\n", status_code=503)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


def create_app(settings: Settings, *, database: bool = True) -> FastAPI:
    """The standalone exporter: /metrics only (no API, no webhooks)."""
    app = FastAPI(title="Cascade metrics", openapi_url=None, docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.state.metrics_database = database
    app.include_router(router)
    return app


def serve(settings: Settings, host: str, port: int, *, database: bool = True) -> None:
    logs.configure(settings.log_format)
    if not metrics_token(settings):
        raise SystemExit(
            "refusing to serve metrics: set METRICS_TOKEN (or API_TOKEN); "
            "Prometheus sends it as Authorization: Bearer <token>"
        )
    uvicorn.run(
        create_app(settings, database=database),
        host=host,
        port=port,
        access_log=False,
        log_config=logs.uvicorn_log_config(settings.log_format) or uvicorn.config.LOGGING_CONFIG,
    )
