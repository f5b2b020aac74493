"""`GET /campaigns/{name}`: a campaign's live page, for an operator's browser.

The HTML report's drawing (worker.html_report) over the campaign's figures now, plus the
send and delivery rates of the last minute. While any message is not final the page reloads
itself (`<meta http-equiv="refresh">`, every CAMPAIGN_PAGE_REFRESH_SECONDS): no script, so
it works wherever the report does; once everything is final it stops.

Who may read it: the API_TOKEN, or READONLY_TOKEN (which opens these pages and nothing
else), given one of three ways, since a browser cannot easily send a bearer header:
- `Authorization: Bearer <token>` (curl, a proxy that adds it);
- `?token=<token>` once: the answer is a 303 to the same URL without it, setting the token
  as an HttpOnly cookie (path /campaigns, SameSite=Lax, Secure over https), so the token
  leaves the address bar, the history of the page and any link copied from it;
- that cookie, `cascade_page_token`, on every later load and reload.
Nothing here logs a token, and the API runs without an access log (worker.http.app.serve).
"""

from __future__ import annotations

import hmac
from datetime import datetime, timedelta
from html import escape
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import Engine, func, select

from config import Settings
from worker.core.states import State
from worker.flows.producer import MAX_CAMPAIGN_LENGTH
from worker.http.app import app_settings
from worker.ops import cache
from worker.ops.html_report import (
    _STYLE,
    _bar_chart,
    _card,
    _errors,
    _headline,
    _percent,
    _section,
    _state_bars,
    _state_table,
    _timeline_chart,
)
from worker.ops.reports import analytics_figure, campaign_summary, deliveries_over_time
from worker.store.db import get_engine, utcnow
from worker.store.models import messages

COOKIE = "cascade_page_token"
RATE_WINDOW_SECONDS = 60

router = APIRouter(tags=["pages"])


# --- who may read ----------------------------------------------------------------------------


def page_tokens(settings: Settings) -> list[bytes]:
    """The tokens that open a page: API_TOKEN and READONLY_TOKEN, those that are set."""
    found = (settings.api_token, settings.readonly_token)
    return [t.get_secret_value().encode() for t in found if t and t.get_secret_value()]


def opens_pages(given: str | None, settings: Settings) -> bool:
    """Constant-time against each configured token; nothing configured opens nothing."""
    if not given:
        return False
    candidate = given.encode("utf-8", "surrogateescape")
    # Every token is compared, so the time taken does not tell which one matched.
    return sum(hmac.compare_digest(candidate, token) for token in page_tokens(settings)) > 0


def _bearer(request: Request) -> str | None:
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    return credentials.strip() if scheme.lower() == "bearer" else None


# --- the page --------------------------------------------------------------------------------


@router.get(
    "/campaigns/{campaign:path}",
    summary="A campaign's live page (HTML)",
    response_class=HTMLResponse,
    responses={
        303: {
            "description": "`?token=` was right: the same page without it, the token set "
            "as the cascade_page_token cookie."
        },
        401: {"description": "No token, or neither API_TOKEN nor READONLY_TOKEN (a page)."},
        404: {"description": "No stored message has this campaign (a page naming it)."},
        503: {"description": "The database is unavailable."},
    },
)
def campaign_page(
    campaign: str, request: Request, settings: Annotated[Settings, Depends(app_settings)]
) -> Response:
    """Progress by state, send and delivery rates, deliveries over time and the top errors;
    reloads itself while the campaign runs. Token: bearer header, cookie, or `?token=`."""
    query_token = request.query_params.get("token")
    if query_token is not None:
        if not opens_pages(query_token, settings):
            return _unauthorised()
        return _drop_token(request, query_token)
    if not (
        opens_pages(_bearer(request), settings)
        or opens_pages(request.cookies.get(COOKIE), settings)
    ):
        return _unauthorised()
    if len(campaign) > MAX_CAMPAIGN_LENGTH or not campaign.isprintable():
        return _not_found(campaign)
    engine = get_engine(settings.database_url)
    summary = campaign_summary(engine, campaign, settings.broker_url)
    if summary is None:
        return _not_found(campaign)
    refresh = settings.campaign_page_refresh_seconds
    figures = cache.FIGURES  # the API's report shares the analytics
    # Kept apart once all final: the last page is computed after the last message ended.
    key = (engine, campaign, summary["all_final"])
    analytics = analytics_figure(figures, *key, refresh)
    timeline = figures.get(
        (*key, "timeline"), lambda: deliveries_over_time(engine, campaign), refresh
    )
    rates = figures.get((*key, "rates"), lambda: recent_rates(engine, campaign, utcnow()), refresh)
    page = render_live_page(
        summary | analytics.value,
        timeline.value,
        rates.value,
        now=utcnow(),
        refresh_seconds=refresh,
        figures_age=max(analytics.age, timeline.age, rates.age),
    )
    return HTMLResponse(page, headers=_PRIVATE)


_PRIVATE = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}


def _drop_token(request: Request, token: str) -> RedirectResponse:
    """The same URL without `token`, other parameters kept; the token moves to a cookie."""
    rest = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
    target = request.url.path + (f"?{urlencode(rest)}" if rest else "")
    response = RedirectResponse(target, status_code=303, headers=_PRIVATE)
    response.set_cookie(
        COOKIE,
        token,
        path="/campaigns",
        httponly=True,
        samesite="lax",  # sent on a link followed from elsewhere; Strict would not be
        secure=request.url.scheme == "https",
    )
    return response


def _unauthorised() -> HTMLResponse:
    body = (
        "<p>This page needs the API token or the read-only token (<code>READONLY_TOKEN</code>)."
        " Open it once as <code>/campaigns/NAME?token=…</code>: the token is then kept in a "
        "cookie and dropped from the address; or send <code>Authorization: Bearer …</code>.</p>"
    )
    return HTMLResponse(
        _document("Not authorised", f"<h1>Not authorised</h1>{body}"),
        status_code=401,
        headers={"WWW-Authenticate": "Bearer", **_PRIVATE},
    )


def _not_found(campaign: str) -> HTMLResponse:
    name = escape(campaign)
    body = f"<h1>No campaign named “{name}”</h1><p>No stored message has this campaign.</p>"
    return HTMLResponse(_document(f"No campaign {name}", body), status_code=404, headers=_PRIVATE)


def recent_rates(engine: Engine, campaign: str, now: datetime) -> dict[str, Any]:
    """Messages the provider accepted, and messages delivered, in the last minute up to
    `now`: the page's send and delivery rates (per second, over RATE_WINDOW_SECONDS)."""
    since = now - timedelta(seconds=RATE_WINDOW_SECONDS)
    m = messages.c
    with engine.connect() as conn:
        sent = conn.execute(
            select(func.count()).where(
                m.campaign == campaign, m.submitted_at > since, m.submitted_at <= now
            )
        ).scalar_one()
        delivered = conn.execute(
            select(func.count()).where(
                m.campaign == campaign,
                m.state == State.DELIVERED,
                m.final_at > since,
                m.final_at <= now,
            )
        ).scalar_one()
    return {"window_seconds": RATE_WINDOW_SECONDS, "sent": sent, "delivered": delivered}


def render_live_page(
    report: dict[str, Any],
    timeline: dict[str, Any],
    rates: dict[str, Any],
    *,
    now: datetime,
    refresh_seconds: float,
    figures_age: float = 0.0,
) -> str:
    """The page: campaign_report()'s figures, deliveries_over_time()'s chart, recent_rates().
    `figures_age`: seconds since the oldest of the scanned figures (all but the counts)."""
    name = escape(str(report["campaign"]))
    running = not report["all_final"]
    control = report.get("control") or {}
    status = str(control.get("status") or "running")
    if not running:
        state_line = "All messages are final: this page no longer reloads."
    else:
        state_line = (
            f"Campaign {status}; {report['total'] - report['final']:,} messages not final yet; "
            f"this page reloads every {refresh_seconds:g} s."
        )
    if control.get("pause_reason"):
        state_line += f" {status.capitalize()}: {control['pause_reason']}."
    if running and (sending := report.get("sending")):
        state_line += (
            f" Sending is paused for every campaign for about {sending['paused_for_seconds']:.0f}"
            f" s: {sending['reason']}."
        )
    stamp = now.strftime("%Y-%m-%d %H:%M:%S")
    body = "".join(
        [
            f"<h1>Campaign {name}</h1>",
            f'<p class="sub" data-now="{now.isoformat()}" data-running="{str(running).lower()}">'
            f"As of {stamp} UTC. {escape(state_line)}{escape(_age_line(figures_age))}</p>",
            _headline(report),
            _rates(report, rates),
            _section("Deliveries over time", _timeline_chart(timeline)),
            '<div class="row">',
            _section(
                "Progress by state",
                _progress(report)
                + _bar_chart(_state_bars(report["states"]))
                + _state_table(report),
            ),
            _section("Top errors", _errors(report["top_errors"])),
            "</div>",
        ]
    )
    refresh = f'<meta http-equiv="refresh" content="{refresh_seconds:g}">' if running else ""
    return _document(f"Campaign {name}: live", body, head=refresh)


def _age_line(age: float) -> str:
    """The scanned figures are recomputed only so often (worker.ops.cache): say how old."""
    if age < 1:
        return ""
    return f" Rates, chart, channels, latency and errors as of {age:.0f} s ago."


def _rates(report: dict[str, Any], rates: dict[str, Any]) -> str:
    window = rates["window_seconds"]
    cards = [
        _card(
            "Send rate",
            f"{rates['sent'] / window:,.1f}/s",
            f"{rates['sent']:,} accepted by the provider in the last {window} s",
            "sent_last_minute",
        ),
        _card(
            "Delivery rate now",
            f"{rates['delivered'] / window:,.1f}/s",
            f"{rates['delivered']:,} delivered in the last {window} s",
            "delivered_last_minute",
        ),
        _card(
            "Sent",
            f"{report['sent']:,}",
            f"{_percent(report['sent'] / report['total'] if report['total'] else 0)} of messages",
            "sent",
        ),
        _card("Final", f"{report['final']:,}", f"of {report['total']:,} messages", "final"),
    ]
    return f'<div class="cards">{"".join(cards)}</div>'


def _progress(report: dict[str, Any]) -> str:
    """One bar: the share of messages final, as a progress bar and in words."""
    share = report["final"] / report["total"] if report["total"] else 0.0
    return (
        '<div style="background:#eeeeee;border-radius:4px;height:14px;margin:0 0 12px" '
        f'role="progressbar" aria-valuenow="{share * 100:.1f}" aria-valuemin="0" '
        'aria-valuemax="100"><div style="background:#2e7d32;height:14px;border-radius:4px;'
        f'width:{share * 100:.1f}%"></div></div>'
        f'<p style="margin:0 0 12px">{_percent(share)} final</p>'
    )


def _document(title: str, body: str, head: str = "") -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"{head}<title>{title}</title><style>{_STYLE}</style></head>"
        f"<body><main>{body}</main></body></html>\n"
    )
