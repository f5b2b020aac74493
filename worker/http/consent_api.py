"""The suppression list on the HTTP API (bearer token): what `cascade optout` does."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, HTTPException, Path
from fastapi.responses import Response
from pydantic import BaseModel, Field

from worker.core.keywords import phone_problem
from worker.core.redact import mask_phone
from worker.flows import consent
from worker.http.app import UNAUTHORIZED, UNAVAILABLE, SettingsDep, _error, require_token
from worker.http.schemas import PRINTABLE_PATTERN, ValidationErrorBody
from worker.store.db import get_engine

MAX_ITEMS = 10_000
_UNSTORABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")

router = APIRouter(prefix="/v1", tags=["consent"], dependencies=[Depends(require_token)])


class OptoutIn(BaseModel):
    phone: str = Field(max_length=40, examples=["+380671234567"])
    evidence: str | None = Field(
        None, max_length=2000, description="Why: kept with the number (e.g. 'asked by phone')."
    )


class OptoutResult(BaseModel):
    phone: str = Field(description="In E.164 when accepted; as given when refused.")
    status: Literal["added", "already", "refused"]
    reason: str | None = None
    suppressed: int = Field(0, description="Unsent promo and surveys ended as suppressed.")


class Optout(BaseModel):
    phone: str = Field(description="Masked; GET /v1/optouts/export gives the numbers whole.")
    addedAt: str | None
    source: str
    evidence: str | None


class Removed(BaseModel):
    phone: str
    removed: bool


LISTED = 1000


@router.get(
    "/optouts",
    summary=f"The newest {LISTED:,} numbers on the suppression list (masked)",
    response_model=list[Optout],
    responses={401: UNAUTHORIZED, 503: UNAVAILABLE},
)
def list_optouts(settings: SettingsDep) -> Any:
    """What `cascade optout list` shows; GET /v1/optouts/export gives the whole list."""
    return consent.list_numbers(get_engine(settings.database_url), LISTED)


@router.get(
    "/optouts/export",
    summary="The whole suppression list as CSV (E.164)",
    response_class=Response,
    responses={
        200: {"content": {"text/csv": {"schema": {"type": "string"}}}},
        401: UNAUTHORIZED,
        503: UNAVAILABLE,
    },
)
def export_optouts(settings: SettingsDep) -> Response:
    body = "".join(consent.export_csv(get_engine(settings.database_url)))
    return Response(body, media_type="text/csv")


@router.post(
    "/optouts/import",
    summary="Add numbers to the suppression list (one result per item)",
    response_model=list[OptoutResult],
    response_model_exclude_none=True,
    responses={
        400: _error("The body is not JSON."),
        401: UNAUTHORIZED,
        422: _error("The body is not an array of {phone, evidence}.", ValidationErrorBody),
        503: UNAVAILABLE,
    },
)
def add_optouts(
    settings: SettingsDep,
    items: Annotated[list[OptoutIn], Body(max_length=MAX_ITEMS)],
) -> Any:
    """Each number must be E.164 (or national, read with DEFAULT_PHONE_REGION); a refused
    item never stops the others. Their unsent promo and surveys end as `suppressed`."""
    results: list[dict[str, Any]] = []
    chosen: list[tuple[int, str, str | None]] = []
    for index, item in enumerate(items):
        phone, problem = phone_problem(item.phone, settings.default_phone_region)
        if phone is None or (item.evidence and _UNSTORABLE.search(item.evidence)):
            reason = f"phone {problem}" if phone is None else "evidence has control characters"
            results.append({"phone": item.phone, "status": "refused", "reason": reason})
            continue
        results.append({})
        chosen.append((index, phone, item.evidence))
    with get_engine(settings.database_url).begin() as conn:
        for index, phone, evidence in chosen:
            change = consent.add(
                conn, phone, source="api", evidence=evidence, types=settings.suppressed_types
            )
            results[index] = {
                "phone": phone,
                "status": "added" if change.changed else "already",
                "suppressed": change.suppressed,
            }
    return results


@router.delete(
    "/optouts/numbers/{phone}",
    summary="Take a number off the suppression list",
    response_model=Removed,
    responses={
        401: UNAUTHORIZED,
        404: _error("The number is not on the list (or is not a number in E.164)."),
        422: _error("The path is too long or has control characters.", ValidationErrorBody),
        503: UNAVAILABLE,
    },
)
def remove_optout(
    phone: Annotated[
        str, Path(max_length=40, pattern=PRINTABLE_PATTERN, examples=["+380671234567"])
    ],
    settings: SettingsDep,
) -> Any:
    number, problem = phone_problem(phone, settings.default_phone_region)
    if number is None:
        raise HTTPException(404, f"not on the list: phone {problem}")
    with get_engine(settings.database_url).begin() as conn:
        change = consent.remove(conn, number, source="api")
    if not change.changed:
        raise HTTPException(404, f"{mask_phone(number)} is not on the list")
    return {"phone": number, "removed": True}
