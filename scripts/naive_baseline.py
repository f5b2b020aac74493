"""The naive baseline of `scripts/bench.py`: what the provider's examples lead one to write.

One Celery task per message POSTs a one-element array, then one countdown task per message
checks its status every 5 s until it is final. Results go to a small table, one row
update at a time. This is the comparison point, not a way to run the product.

    celery -A scripts.naive_baseline worker   (with NAIVE_DATABASE_URL, NAIVE_BROKER_URL,
                                               NAIVE_PROVIDER_URL, NAIVE_API_KEY set)
"""

from __future__ import annotations

import os

import httpx
from celery import Celery
from sqlalchemy import Column, MetaData, String, Table, update

from worker.store.db import make_engine

metadata = MetaData()
naive_messages = Table(
    "naive_messages",
    metadata,
    Column("id", String(254), primary_key=True),
    Column("message_id", String(64)),
    Column("status", String(32)),
)

app = Celery("naive", broker=os.environ.get("NAIVE_BROKER_URL", "redis://127.0.0.1:6379/0"))
app.conf.update(task_ignore_result=True, worker_prefetch_multiplier=4)
_engine = None
_client = None
FINAL = {"delivered", "undeliverable", "permanenterror"}


def engine():  # type: ignore[no-untyped-def]
    global _engine
    if _engine is None:
        _engine = make_engine(os.environ["NAIVE_DATABASE_URL"])  # WAL + busy timeout on SQLite
    return _engine


def client() -> httpx.Client:
    global _client
    if _client is None:
        _client = httpx.Client(
            base_url=os.environ["NAIVE_PROVIDER_URL"],
            headers={"X-Authorization-Key": os.environ["NAIVE_API_KEY"]},
            timeout=30,
        )
    return _client


@app.task(name="naive.send", bind=True, max_retries=5)
def send(self, message: dict) -> None:  # type: ignore[no-untyped-def]
    response = client().post("/api/CascadeMessage/send_message/async", json=[message])
    if response.status_code != 200:
        raise self.retry(countdown=2)
    message_id = response.json()[0]["messageId"]
    with engine().begin() as conn:
        conn.execute(
            update(naive_messages)
            .where(naive_messages.c.id == message["id"])
            .values(message_id=message_id, status="submitted")
        )
    poll.apply_async((message["id"], message_id), countdown=5)


@app.task(name="naive.poll")
def poll(tracking_id: str, message_id: str) -> None:
    status = client().get(f"/bat/message/{message_id}").json()["deliverystatus"]
    with engine().begin() as conn:
        conn.execute(
            update(naive_messages).where(naive_messages.c.id == tracking_id).values(status=status)
        )
    if status not in FINAL:
        poll.apply_async((tracking_id, message_id), countdown=5)
