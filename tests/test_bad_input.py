"""Bad input at every door, by property: messages (Python, Celery-free `enqueue` and the
HTTP API), CSV files, webhook and DLR bodies, and settings.

Each door must answer every input without a crash (no exception, no 5xx), name the field
and the problem of what it refuses, and never lose the valid input that came beside it.
Everything lands in a real SQLite file (and PostgreSQL for the characters it refuses).
"""

from __future__ import annotations

import csv
import json
import os
import re
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from pydantic import ValidationError
from sqlalchemy import delete, func, select

from config import Settings
from tests.conftest import REDIS, claim_redis_db, release_redis_db
from tests.helpers import JSON_VALUES, valid_messages
from worker.core.validation import FIELDS, OutgoingMessage, validate_message
from worker.flows.campaigns import CampaignError
from worker.flows.launch import Defaults, launch, rejected_path
from worker.flows.producer import enqueue
from worker.http.app import create_app
from worker.store.db import get_engine, utcnow
from worker.store.models import campaigns, events, inbound_messages, messages, provider_reports

TOKEN, HOOK_TOKEN = "bad-input-api-token", "bad-input-hook-token"
PROPERTY = hypothesis_settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Every Unicode plane, and what breaks storage: lone surrogates, NUL, other controls.
HOSTILE_CHARS = st.one_of(
    st.characters(codec=None),
    st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF),
    st.characters(min_codepoint=0x10000, max_codepoint=0x10FFFF),
    st.sampled_from(["\x00", "\x1b", "\x7f", "\x85", "\u200b", "\u202e", "\ufeff", "\uffff"]),
)
HOSTILE_TEXT = st.text(HOSTILE_CHARS, max_size=40) | st.integers(4090, 4100).map(lambda n: "é" * n)
HOSTILE_VALUES = (
    JSON_VALUES
    | HOSTILE_TEXT
    | st.lists(HOSTILE_TEXT, max_size=6)
    | st.sampled_from(
        [
            "9999-12-31T23:59:59-23:59",
            "0001-01-01T00:00:00+01:00",
            "2025-02-30T10:00:00Z",
            "2025-01-25T10:00:00",
            "+380671234567\x00",
            "+38067123456\ud800",
            "0067 123 45 67",
            2**70,
            -(2**70),
            float("nan"),
            float("inf"),
        ]
    )
)
FIELD_NAME = re.compile(r"^(?:surveyOptions\[\d+\]|message|\S.*)$")


@contextmanager
def fresh_tables(url: str) -> Iterator[None]:
    """Each example starts empty, so ids drawn again in a later example are new again."""
    engine = get_engine(url)
    with engine.begin() as conn:
        for table in (events, provider_reports, inbound_messages, messages, campaigns):
            conn.execute(delete(table))
    yield


@pytest.fixture(scope="module")
def broker() -> Iterator[str]:
    index = claim_redis_db()
    yield f"{REDIS}/{index}"
    release_redis_db(index)


@pytest.fixture(scope="module")
def config(database_factory: Callable[[str], str], broker: str) -> Settings:
    return Settings(  # type: ignore[call-arg]
        _env_file=None,
        DATABASE_URL=database_factory("sqlite"),
        BROKER_URL=broker,
        API_TOKEN=TOKEN,
        WEBHOOK_TOKEN=HOOK_TOKEN,
    )


@pytest.fixture(scope="module")
def postgres(database_factory: Callable[[str], str]) -> str:
    """One PostgreSQL database for the regressions of what only PostgreSQL refuses."""
    return database_factory("postgresql")


@pytest.fixture(scope="module")
def client(config: Settings) -> Iterator[TestClient]:
    """The real app; TestClient re-raises any unhandled exception, so a crash fails."""
    with TestClient(create_app(config)) as http:
        yield http


def stored(url: str, table: Any = messages) -> list[Any]:
    with get_engine(url).connect() as conn:
        return list(conn.execute(select(table)))


# --- messages ------------------------------------------------------------------------------


@st.composite
def mixed_batches(draw: st.DrawFn) -> list[dict[str, Any] | object]:
    """Valid messages, some with one field replaced by hostile input, and non-objects."""
    batch: list[Any] = []
    for index in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["valid", "broken", "extra", "junk"]))
        item = draw(valid_messages()) | {"id": f"m{index}-{uuid.uuid4().hex[:8]}"}
        if kind == "broken":
            item[draw(st.sampled_from(FIELDS))] = draw(HOSTILE_VALUES)
        elif kind == "extra":
            item[draw(HOSTILE_TEXT)] = draw(HOSTILE_VALUES)
        elif kind == "junk":
            item = draw(HOSTILE_VALUES)
        batch.append(item)
    return batch


def check_answers(batch: list[Any], answers: list[dict[str, Any]], url: str) -> None:
    """Every valid message stored as given, every other one refused with named fields."""
    now = utcnow()
    rows = {row.id: row for row in stored(url)}
    assert len(answers) == len(batch)
    for raw, answer in zip(batch, answers, strict=True):
        verdict = validate_message(raw, now=now)
        if isinstance(verdict, OutgoingMessage):
            assert answer["status"] == "accepted", (raw, answer)
            row = rows[verdict.id]
            assert (row.to_phone, row.text) == (verdict.to_phone, verdict.text)
        else:
            assert answer["status"] == "rejected", (raw, answer)
            assert answer["errors"]
            for error in answer["errors"]:
                assert FIELD_NAME.match(error["field"]) and error["problem"]
    assert len(rows) == sum(a["status"] == "accepted" for a in answers)


@PROPERTY
@given(mixed_batches())
@example(
    [
        {
            "id": "sur",
            "fromName": "T",
            "toPhone": "+380671234567",
            "messageType": "promo",
            "text": "a\ud800b",
        }
    ]
)
@example(
    [
        {
            "id": "sur-option",
            "fromName": "T",
            "toPhone": "+380671234567",
            "messageType": "viber_survey",
            "text": "q",
            "surveyOptions": ["a\udfff", "b"],
        }
    ]
)
@example(
    [
        {
            "id": "nul",
            "fromName": "T",
            "toPhone": "+380671234567",
            "messageType": "promo",
            "text": "a\x00b",
        }
    ]
)
def test_enqueue_stores_every_valid_message_and_names_every_problem(
    config: Settings, batch: list[Any]
) -> None:
    with fresh_tables(config.database_url):
        answers = [r.as_dict() for r in enqueue(batch, "bad-input", settings=config, kick=False)]
        check_answers(batch, answers, config.database_url)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"text": "a\x00b"}, "text"),
        ({"text": "a\ud800b"}, "text"),
        ({"fromName": "Shop\udfff"}, "fromName"),
        ({"callbackUrl": "https://h\ud800.example/x"}, "callbackUrl"),
        ({"messageType": "viber_survey", "surveyOptions": ["a\x00", "b"]}, "surveyOptions[0]"),
    ],
)
def test_characters_postgresql_cannot_store_cost_one_message(
    postgres: str, change: dict[str, Any], field: str
) -> None:
    """Before: a NUL (PostgreSQL) or a lone surrogate (UTF-8) failed the whole insert."""
    url = postgres
    config = Settings(_env_file=None, DATABASE_URL=url)  # type: ignore[call-arg]
    base = {"fromName": "T", "toPhone": "+380671234567", "messageType": "promo", "text": "q"}
    batch = [{**base, "id": "bad", **change}, {**base, "id": "good"}]

    with fresh_tables(url):
        answers = enqueue(batch, "pg-bad-input", settings=config, kick=False)

        assert [a.status for a in answers] == ["rejected", "accepted"]
        assert [e.field for e in answers[0].errors] == [field]
        assert [row.id for row in stored(url)] == ["good"]


def test_a_campaign_name_postgresql_cannot_store_is_refused(postgres: str) -> None:
    config = Settings(_env_file=None, DATABASE_URL=postgres)  # type: ignore[call-arg]
    for name in ("a\x00b", "a\ud800"):
        with pytest.raises(ValueError, match="campaign must not contain control characters"):
            enqueue([], name, settings=config, kick=False)


def test_a_nul_campaign_is_a_422_not_a_postgresql_error(postgres: str, broker: str) -> None:
    url = postgres
    app = create_app(Settings(_env_file=None, DATABASE_URL=url, BROKER_URL=broker, API_TOKEN=TOKEN))  # type: ignore[call-arg]
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with TestClient(app) as http:
        posted = http.post("/v1/messages", params={"campaign": "a\x00"}, json=[], headers=headers)
        report = http.get("/v1/campaigns/a%00", headers=headers)
    for answer, where in ((posted, "query"), (report, "path")):
        assert answer.status_code == 422, answer.text
        assert answer.json()["detail"][0]["loc"] == [where, "campaign"]


@PROPERTY
@given(mixed_batches())
@example([{"id": "a\ud800"}])  # echoed back, the id failed the whole answer's encoding (500)
def test_the_api_answers_every_batch_without_a_server_error(
    client: TestClient, config: Settings, batch: list[Any]
) -> None:
    try:  # ensure_ascii: lone surrogates travel as \ud800 escapes
        body, valid_json = json.dumps(batch, default=str, allow_nan=False), True
    except ValueError:
        body, valid_json = json.dumps(batch, default=str), False
    with fresh_tables(config.database_url):
        answer = client.post(
            "/v1/messages",
            content=body,
            params={"campaign": "api-bad-input"},
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
        )
        if not valid_json:  # NaN and Infinity are not JSON: the body is refused whole
            assert answer.status_code == 400 and "is not JSON" in answer.json()["detail"]
            assert stored(config.database_url) == []
            return
        assert answer.status_code == 200, answer.text
        check_answers(json.loads(body), answer.json(), config.database_url)


@PROPERTY
@given(
    st.binary(max_size=200) | HOSTILE_TEXT.map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.text(HOSTILE_CHARS, max_size=10),
)
@example(b"[]", "a\x00")  # a NUL campaign reached PostgreSQL/SQL as a 500 before
@example(b"[]", "\ud800")  # a lone surrogate, which the test client could not even send
def test_the_api_refuses_any_body_and_campaign_with_a_4xx(
    client: TestClient, body: bytes, campaign: str
) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    # Percent-encoded by hand: the client cannot encode a lone surrogate, a producer can
    # still send its bytes.
    path = quote(campaign.encode("utf-8", "surrogatepass"), safe="")
    answer = client.post(f"/v1/messages?campaign={path}", content=body, headers=headers)
    assert answer.status_code in (200, 400, 413, 422), answer.text
    assert answer.status_code == 200 or answer.json()["detail"]
    report = client.get(f"/v1/campaigns/{path}", headers=headers)
    assert report.status_code in (200, 404, 422), report.text


# --- CSV files -----------------------------------------------------------------------------

PHONES = ["+380671234567", "+14155552671", "+447911123456", "+390612345678"]
VALID_ROW = st.builds(
    lambda phone, text: [phone, text],
    st.sampled_from(PHONES),
    st.text(st.characters(exclude_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1, max_size=30)
    .map(lambda t: t.replace('"', "").replace("|", "").strip())
    .filter(bool),
)
# Rows without a quote: an unbalanced quote legitimately joins the lines after it.
BAD_ROW_BYTES = st.one_of(
    st.builds(lambda p: f"{p},hi\n".encode(), st.sampled_from(["0671234567", "+3806", "x", ""])),
    st.just(b"+380671234567,hi,extra,cells\n"),
    st.just(b"+380671234567\n"),
    st.just(b"+380671234567,\xff\xfe bad utf-8\n"),
    st.just(b"+380671234567,caf\xe9 in latin-1\n"),
    st.just(b"+380671234567," + b"y" * 140_000 + b"\n"),  # over csv's field size limit
    st.just(b"+380671234567,nul\x00inside\n"),
)


@st.composite
def csv_files(draw: st.DrawFn) -> tuple[bytes, list[list[str]], str]:
    separator = draw(st.sampled_from([",", ";", "\t", "|"]))
    line_end = draw(st.sampled_from(["\n", "\r\n"]))
    bom = draw(st.sampled_from([b"", b"\xef\xbb\xbf"]))
    lines = [bom + f"toPhone{separator}text{line_end}".encode()]
    valid: list[list[str]] = []
    for _ in range(draw(st.integers(0, 8))):
        if draw(st.booleans()):
            row = draw(VALID_ROW)
            valid.append(row)
            lines.append((separator.join(f'"{c}"' for c in row) + line_end).encode())
        else:
            lines.append(draw(BAD_ROW_BYTES).replace(b",", separator.encode()))
    return b"".join(lines), valid, separator


def check_launch(path: Path, config: Settings, name: str) -> Any:
    """A launch either refuses the file with a clear CampaignError or accounts every row."""
    try:
        stats = launch(path, name, Defaults(from_name="Shop", message_type="promo"), config)
    except CampaignError as exc:
        assert str(exc)
        return None
    assert stats.accepted + stats.duplicate + stats.rejected == stats.rows
    rejects = rejected_path(path)
    if stats.rejected:
        with rejects.open(encoding="utf-8", newline="") as file:
            refused = list(csv.DictReader(file))
        assert {r["line"] for r in refused} and all(r["field"] and r["reason"] for r in refused)
    else:
        assert not rejects.exists()
    return stats


@PROPERTY
@given(csv_files())
def test_a_launch_keeps_every_valid_row_beside_bad_ones(
    config: Settings, tmp_path_factory: pytest.TempPathFactory, file: tuple[bytes, list, str]
) -> None:
    content, valid, _ = file
    path = tmp_path_factory.mktemp("csv") / "contacts.csv"
    path.write_bytes(content)
    with fresh_tables(config.database_url):
        stats = check_launch(path, config, "csv-mixed")
        assert stats is not None
        texts = sorted(row.text for row in stored(config.database_url))
        assert sorted(text for _, text in valid) == [t for t in texts if t in {v[1] for v in valid}]
        assert stats.accepted >= len(valid)


@PROPERTY
@given(
    st.binary(max_size=300)
    | st.tuples(st.sampled_from(["utf-16", "cp1251", "latin-1", "utf-8"]), HOSTILE_TEXT).map(
        lambda p: ("toPhone,text\n+380671234567," + p[1].replace("\ud800", "")).encode(
            p[0], "replace"
        )
    )
    | st.lists(st.lists(st.text(HOSTILE_CHARS, max_size=8), max_size=5), max_size=5).map(
        lambda rows: "\n".join(["toPhone,text"] + [",".join(r) for r in rows]).encode(
            "utf-8", "surrogatepass"
        )
    )
)
@example(b'toPhone,text\n"+380671234567,unterminated quote\n+14155552671,x\n')
@example(b"\xff\xfe" + "toPhone,text\n".encode("utf-16-le"))
def test_a_launch_never_crashes_on_any_file(
    config: Settings, tmp_path_factory: pytest.TempPathFactory, content: bytes
) -> None:
    path = tmp_path_factory.mktemp("csv") / "any.csv"
    path.write_bytes(content)
    with fresh_tables(config.database_url):
        check_launch(path, config, "csv-any")


# --- webhook and DLR bodies ------------------------------------------------------------------

HOOK = {"Authorization": f"Bearer {HOOK_TOKEN}"}
SMSBAT_VALID = st.fixed_dictionaries(
    {
        "messageId": st.from_regex(r"[a-z0-9-]{1,64}", fullmatch=True),
        "deliverystatus": st.sampled_from(["delivered", "undeliverable", "expired", "processing"]),
    },
    optional={
        "cost": st.floats(0, 10),
        "timestamp": st.sampled_from(["2025-01-20T12:00:00Z", "2025-01-20T14:00:00+02:00"]),
    },
)
BULKGATE_VALID = st.fixed_dictionaries(
    {
        "status": st.sampled_from([1, "3", 6, "13"]),
        "smsID": st.from_regex(r"[0-9]{1,20}", fullmatch=True),
    },
    optional={"price": st.sampled_from(["0.05", 0.1]), "date": st.just("2503301130;2503301131")},
)
INBOUND_VALID = st.fixed_dictionaries(
    {"status": st.just(10), "from": st.sampled_from(["420777777777", "+380671234567"])},
    optional={
        "message": st.text(st.characters(codec="utf-8"), max_size=20).map(
            lambda t: t.replace("\x00", "")
        )
    },
)
HOSTILE_JSON_TEXT = st.text(
    st.characters(codec="utf-8") | st.just("\x00"), max_size=20
)  # orjson refuses lone surrogates before the parsers see them


def broken(valid: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[Any]:
    return (
        st.tuples(valid, HOSTILE_JSON_TEXT, JSON_VALUES | HOSTILE_JSON_TEXT).map(
            lambda t: {**t[0], t[1]: t[2]}
        )
        | st.tuples(
            valid,
            st.sampled_from(
                sorted(
                    {
                        "messageId",
                        "deliverystatus",
                        "cost",
                        "status",
                        "smsID",
                        "price",
                        "date",
                        "from",
                        "timestamp",
                    }
                )
            ),
            JSON_VALUES | HOSTILE_JSON_TEXT,
        ).map(lambda t: {**t[0], t[1]: t[2]})
        | JSON_VALUES
    )


def push(client: TestClient, path: str, items: list[Any], url: str, key: str) -> None:
    """POST a push; NaN/Infinity are not JSON and refuse the body whole (400, nothing kept)."""
    try:
        body = json.dumps(items, allow_nan=False)
    except ValueError:
        answer = client.post(path, content=json.dumps(items), headers=HOOK)
        assert answer.status_code == 400 and answer.json()["detail"].startswith("malformed JSON")
        assert stored(url, provider_reports) == stored(url, inbound_messages) == []
        return
    check_push(client.post(path, content=body, headers=HOOK), items, url, key)


def check_push(answer: Any, items: list[Any], url: str, key: str) -> None:
    """Every element either stored (a report by its provider id, or an inbound SMS) or
    rejected by index with an error that starts with the field it is about."""
    assert answer.status_code == 200, answer.text
    body = answer.json()
    rejected = {r["index"]: r["error"] for r in body["rejected"]}
    for error in rejected.values():
        # The field comes first; a key may itself hold ":" (found by hypothesis: '::').
        assert re.match(r"^(report must be a JSON object|.+?: \S)", error), error
    rows = stored(url, provider_reports)
    reports = {row.provider_message_id for row in rows}
    assert body["accepted"] == len(items) - len(rejected)
    assert body["accepted"] == len(rows) + len(stored(url, inbound_messages))
    for index, item in enumerate(items):
        if index not in rejected and isinstance(item, dict) and key in item:
            assert str(item[key]).strip() in reports


@PROPERTY
@given(st.lists(SMSBAT_VALID | broken(SMSBAT_VALID), min_size=1, max_size=8))
@example(
    [
        {"messageId": "a\x00", "deliverystatus": "delivered"},
        {"messageId": "ok", "deliverystatus": "delivered"},
    ]
)
def test_smsbat_pushes_store_every_valid_report(
    client: TestClient, config: Settings, items: list[Any]
) -> None:
    with fresh_tables(config.database_url):
        push(client, "/webhooks/smsbat", items, config.database_url, "messageId")


@PROPERTY
@given(st.lists(BULKGATE_VALID | INBOUND_VALID | broken(BULKGATE_VALID), min_size=1, max_size=8))
@example([{"status": 10, "from": "420777777777", "text": "a\x00"}, {"status": 1, "smsID": "7"}])
@example(
    [
        {
            "status": 10,
            "from": "420777777777",
            "n": [[[[]]]] * 1 + [json.loads("[" * 900 + "]" * 900)],
        }
    ]
)
def test_bulkgate_arrays_store_every_valid_report(
    client: TestClient, config: Settings, items: list[Any]
) -> None:
    with fresh_tables(config.database_url):
        push(client, "/webhooks/bulkgate", items, config.database_url, "smsID")


@pytest.mark.parametrize(
    ("method", "path", "body", "error"),
    [
        ("POST", "/webhooks/smsbat", [{"messageId": "a\x00", "deliverystatus": "delivered"}],
         "messageId: contains a NUL"),
        ("POST", "/webhooks/bulkgate", [{"status": 10, "from": "420777777777", "text": "a\x00"}],
         "text: contains a NUL"),
        ("POST", "/webhooks/bulkgate", [{"status": 1, "smsID": "7", "note\x00": "x"}],
         "'note\\x00': contains a NUL"),
        ("GET", "/webhooks/bulkgate", {"status": "10", "from": "a\x00"}, "from: contains a NUL"),
    ],
)  # fmt: skip
def test_a_nul_costs_one_report_not_the_push_on_postgresql(
    postgres: str, broker: str, method: str, path: str, body: Any, error: str
) -> None:
    """Before: PostgreSQL refused the NUL and the whole push was a 500 (and retried)."""
    config = Settings(
        _env_file=None, DATABASE_URL=postgres, BROKER_URL=broker, WEBHOOK_TOKEN=HOOK_TOKEN
    )  # type: ignore[call-arg]
    with fresh_tables(postgres), TestClient(create_app(config)) as http:
        if method == "GET":
            answer = http.get(path, params={**body, "token": HOOK_TOKEN})
        else:
            valid = {"status": 1, "smsID": "99"} if "bulkgate" in path else {
                "messageId": "ok", "deliverystatus": "delivered"}  # fmt: skip
            answer = http.post(path, content=json.dumps([*body, valid]), headers=HOOK)
    assert answer.status_code == 200, answer.text
    assert answer.json()["rejected"][0]["index"] == 0
    assert answer.json()["rejected"][0]["error"].startswith(error)
    assert answer.json()["accepted"] == (0 if method == "GET" else 1)


@PROPERTY
@given(
    st.dictionaries(
        st.sampled_from(["status", "smsID", "price", "date", "from", "message", "x"]),
        st.text(st.characters(codec="utf-8") | st.just("\x00"), max_size=15),
    )
)
@example({"status": "1", "smsID": "a\x00"})
@example({"status": "10", "from": "a\x00"})
def test_the_bulkgate_query_form_never_fails(
    client: TestClient, config: Settings, params: dict[str, str]
) -> None:
    with fresh_tables(config.database_url):
        answer = client.get("/webhooks/bulkgate", params={**params, "token": HOOK_TOKEN})
        check_push(answer, [params], config.database_url, "smsID")


# --- settings ------------------------------------------------------------------------------

SECRETS = {
    "SMSBAT_API_KEY": "key-Zq81secret",
    "SMSBAT_PASSWORD": "pw-Zq82secret",
    "SMSBAT_VIBER_TOKEN": "viber-Zq83secret",
    "SMSBAT_TG_BOT_KEY": "tg-Zq84secret",
    "WEBHOOK_TOKEN": "hook-Zq85secret",
    "API_TOKEN": "api-Zq86secret",
    "WEBHOOK_SIGNING_SECRET": "sign-Zq87secret",
    "CALLBACK_SIGNING_SECRET": "cb-Zq88secret",
    "FLOWER_BASIC_AUTH": "ops:flower-Zq89secret",
}
SECRET_SETTINGS = {*SECRETS, "DATABASE_URL", "BROKER_URL"}
ALIASES = sorted(str(field.alias) for field in Settings.model_fields.values())
SETTING_VALUES = st.one_of(
    st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=30),
    st.sampled_from(["inf", "-inf", "nan", "1e308", "-1", "0", "9" * 5000, "true", "Zq9pass@h"]),
    st.sampled_from(["mysql://u:Zq9pass@h/db", "redis//:Zq9pass@h", "Zq9pass"]),
)


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """Settings read os.environ; set exactly these variables, then restore it."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(values)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@PROPERTY
@given(st.sampled_from(ALIASES), SETTING_VALUES)
@example("SEND_LINGER_SECONDS", "inf")  # passed gt/ge checks, overflowed timedelta later
@example("SCHEDULE_PAST_SKEW_SECONDS", "1e300")  # the same, finite
@example("DATABASE_URL", "Zq9pass@h/db")  # echoed whole as "got scheme ..."
@example("BROKER_URL", "Zq9pass")  # accepted, failed only inside Celery
def test_every_bad_setting_names_itself_and_echoes_no_secret(alias: str, value: str) -> None:
    env = {**SECRETS, "DATABASE_URL": "postgresql://u:db-Zq80secret@h/db", alias: value}
    with environment(env):
        try:
            loaded = Settings(_env_file=None)  # type: ignore[call-arg]
        except ValidationError as exc:
            message = str(exc)
            assert alias in message, message
            for secret in (*SECRETS.values(), "db-Zq80secret", "flower-Zq89secret"):
                assert secret.split(":")[-1] not in message
            if alias in SECRET_SETTINGS or "Zq9pass" in value:
                assert "Zq9pass" not in message
            return
    shown = repr(loaded) + str(loaded)
    assert not any(secret in shown for secret in SECRETS.values())
    for name, field in Settings.model_fields.items():
        if name.endswith("_seconds"):
            assert getattr(loaded, name) is None or getattr(loaded, name) <= 366 * 86400, field


def test_stored_counts_are_exact_after_a_mixed_launch(config: Settings, tmp_path: Path) -> None:
    """One concrete mixed file, so a regression is readable without hypothesis output."""
    path = tmp_path / "mixed.csv"
    path.write_bytes(
        b"toPhone;text\r\n+380671234567;ok one\r\n0671234567;national\r\n"
        + b"+14155552671;"
        + b"y" * 140_000
        + b"\r\n+447911123456;ok two\r\n"
        + b"+390612345678;\xff\r\n+380671234567;nul\x00\r\n"
    )
    with fresh_tables(config.database_url):
        stats = launch(path, "mixed", Defaults(from_name="Shop", message_type="promo"), config)
        with get_engine(config.database_url).connect() as conn:
            texts = set(conn.execute(select(messages.c.text)).scalars())
            count = conn.execute(select(func.count()).select_from(messages)).scalar_one()
    assert texts == {"ok one", "ok two"} and count == 2
    assert (stats.accepted, stats.rejected) == (2, 4)
