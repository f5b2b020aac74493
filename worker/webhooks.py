"""Webhook receivers. Stub: helper B implements `router`."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
