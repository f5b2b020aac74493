"""Campaign launches from CSV files, cancellation and the listing."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import func, select

from config import Settings
from tests.conftest import Stack, make_messages
from worker.core.validation import validate_message
from worker.flows.campaigns import CampaignCancelled, CampaignError, cancel_campaign
from worker.flows.launch import Defaults, Row, generated_id, launch, read_rows, to_message
from worker.store.db import get_engine, utcnow
from worker.store.models import messages

HEADER = "id,fromName,toPhone,messageType,text\n"


def write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, str):
        text = text.encode()
    path.write_bytes(text)
    return path


def big_file(path: Path, rows: int, bad_every: int = 10) -> Path:
    """`rows` rows without ids; every `bad_every`-th has a national-format phone."""
    with path.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["toPhone", "name", "code"])
        for i in range(rows):
            phone = f"067{i:07d}" if i % bad_every == bad_every - 1 else f"+38067{i:07d}"
            writer.writerow([phone, f"n{i}", f"{i:06d}"])
    return path


DEFAULTS = Defaults(from_name="Shop", message_type="transaction", text="Hi {name}, code {code}")


def count(url: str, campaign: str) -> int:
    with get_engine(url).connect() as conn:
        return conn.execute(
            select(func.count()).select_from(messages).where(messages.c.campaign == campaign)
        ).scalar_one()


# --- pure parts ----------------------------------------------------------------------


def test_generated_ids_are_stable_valid_and_distinct() -> None:
    a = generated_id("Spring sale 2026!", 7, "+380671234567")
    assert a == generated_id("Spring sale 2026!", 7, "+380671234567")
    assert a != generated_id("Spring sale 2026!", 8, "+380671234567")
    assert a != generated_id("Spring sale 2026!", 7, "+380671234568")
    assert a.startswith("Spring-sale-2026-7-")
    message = {"id": a, "fromName": "x", "toPhone": "+380671234567", "messageType": "flashcall"}
    assert not isinstance(validate_message(message, now=utcnow()), list)


def test_rows_become_api_messages_with_defaults_and_templates() -> None:
    row = Row(4, {"toPhone": " +380671234567 ", "name": "Olena", "code": "42", "ttl": "600"})
    assert to_message(row, DEFAULTS, "c") == {
        "id": generated_id("c", 4, "+380671234567"),
        "toPhone": "+380671234567",
        "fromName": "Shop",
        "messageType": "transaction",
        "text": "Hi Olena, code 42",
        "ttl": 600,
    }
    survey = Row(5, {"toPhone": "+1", "messageType": "viber_survey", "surveyOptions": "Yes | No"})
    assert to_message(survey, Defaults(), "c")["surveyOptions"] == ["Yes", "No"]
    own = Row(6, {"id": "mine", "toPhone": "+1", "text": "own text", "ttl": "soon"})
    message = to_message(own, DEFAULTS, "c")
    assert (message["id"], message["text"], message["ttl"]) == ("mine", "own text", "soon")


# --- reading files -------------------------------------------------------------------


def test_excel_style_files_just_work(tmp_path: Path) -> None:
    body = '\ufeffid;toPhone;text\r\nA1;+380671234567;"hello; world"\r\nA2;+380671234568;x\r\n'
    layout, rows = read_rows(write(tmp_path / "x.csv", body.encode()), Defaults())
    assert layout.columns == ["id", "toPhone", "text"] and layout.delimiter == ";"
    assert [(r.line, r.values["text"]) for r in rows] == [(2, "hello; world"), (3, "x")]


def test_header_names_are_matched_case_insensitively_and_extras_reported(tmp_path: Path) -> None:
    layout, _ = read_rows(write(tmp_path / "x.csv", "TOPHONE,Text,segment\n"), Defaults())
    assert layout.columns == ["toPhone", "text", "segment"]
    assert layout.ignored == ["segment"]


def test_a_column_the_template_uses_in_another_case_is_not_reported_ignored(
    tmp_path: Path,
) -> None:
    """`--text "Hi {name}"` over a column headed `Name` fills it: it is not ignored."""
    layout, rows = read_rows(
        write(tmp_path / "x.csv", "Phone,Name,Segment\n+380671234567,Olena,a\n"),
        Defaults(text="Hi {name}", columns=(("phone", "toPhone"),)),
    )
    assert layout.ignored == ["Segment"]
    assert to_message(next(rows), Defaults(text="Hi {name}"), "c")["text"] == "Hi Olena"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is empty"),
        (b"   \n\n", "is empty"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not a CSV text file"),
        (b"id,fromName,text\nA,b,c\n", "no toPhone column (found: id, fromName, text)"),
        (b"toPhone,toPhone\n", "repeats columns: toPhone"),
    ],
)
def test_bad_files_get_a_clear_message(tmp_path: Path, content: bytes, message: str) -> None:
    with pytest.raises(CampaignError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_rows(write(tmp_path / "x.csv", content), Defaults())


def test_missing_file_and_template_columns(tmp_path: Path) -> None:
    with pytest.raises(CampaignError, match="no such file"):
        read_rows(tmp_path / "absent.csv", Defaults())
    with pytest.raises(CampaignError, match="--text uses columns the file does not have: code"):
        read_rows(write(tmp_path / "x.csv", "toPhone,name\n"), Defaults(text="{name} {code}"))


def test_short_rows_are_padded_so_templates_still_fill(tmp_path: Path) -> None:
    _, rows = read_rows(
        write(tmp_path / "x.csv", "toPhone,name,code\n+380671234567,Ann\n"), DEFAULTS
    )
    row = next(rows)
    assert row.values == {"toPhone": "+380671234567", "name": "Ann", "code": ""}
    assert to_message(row, DEFAULTS, "c")["text"] == "Hi Ann, code "


def test_a_badly_encoded_line_costs_one_row(tmp_path: Path) -> None:
    content = b"toPhone,text\n+380671234567,ok\n+380671234568,caf\xe9\n+380671234569,fine\n"
    _, rows = read_rows(write(tmp_path / "x.csv", content), Defaults())
    rows = list(rows)
    assert [r.line for r in rows] == [2, 3, 4]
    assert rows[1].problem == "not valid UTF-8; save the file as UTF-8"
    assert rows[0].problem is None and rows[2].values["text"] == "fine"


# --- contact lists as operators have them ---------------------------------------------

OPERATOR_LIST = (
    "phone;name\r\n"
    "+380671234567;Olena\r\n"
    "067 123 4568;Taras\r\n"
    "380671234569;Ivan\r\n"
    "067 12;Short\r\n"
    "3.80671E+11;Excel\r\n"
)
MAPPED = Defaults(
    from_name="Shop",
    message_type="promo",
    text="Hi {name}",
    region="UA",
    columns=(("phone", "toPhone"),),
)


def test_columns_are_mapped_to_fields_and_bad_mappings_named(tmp_path: Path) -> None:
    from worker.flows.launch import column_mapping

    assert column_mapping(["Phone = toPhone", "msg=TEXT"]) == (
        ("phone", "toPhone"),
        ("msg", "text"),
    )
    with pytest.raises(CampaignError, match="maps to an unknown field 'mobile'"):
        column_mapping(["phone=mobile"])
    with pytest.raises(CampaignError, match="must be HEADER=FIELD"):
        column_mapping(["phone"])
    path = write(tmp_path / "x.csv", "\ufeffPhone\tName\n+380671234567\tOlena\n")
    layout, rows = read_rows(path, MAPPED)
    assert layout.columns == ["toPhone", "Name"] and layout.delimiter == "\t"
    row = next(rows)
    assert row.values["toPhone"] == row.values["Phone"] == "+380671234567"
    with pytest.raises(CampaignError, match="--column mobile=toPhone: the file has no column"):
        read_rows(path, Defaults(columns=(("mobile", "toPhone"),)))
    with pytest.raises(CampaignError, match="map yours with --column, like --column phone="):
        read_rows(path, Defaults())


def test_excel_sep_line_is_honoured(tmp_path: Path) -> None:
    path = write(tmp_path / "x.csv", "sep=;\r\ntoPhone;text\r\n+380671234567;a, b\r\n")
    layout, rows = read_rows(path, Defaults())
    assert layout.delimiter == ";"
    assert [(r.line, r.values["text"]) for r in rows] == [(3, "a, b")]


def test_xlsx_workbooks_are_read_streamed_with_sheet_row_numbers(tmp_path: Path) -> None:
    from openpyxl import Workbook

    book = Workbook(write_only=True)
    sheet = book.create_sheet("contacts")
    sheet.append(["Phone", "Name", None])
    sheet.append([380671234567, "Olena"])  # a phone typed as a number
    sheet.append([None, None])  # an empty row is skipped, the numbering goes on
    sheet.append(["067 123 4568", "Taras", "extra"])
    sheet.append(["+380671234569", 7.5])
    book.save(tmp_path / "list.xlsx")

    layout, rows = read_rows(tmp_path / "list.xlsx", MAPPED)
    got = list(rows)

    assert layout.columns == ["toPhone", "Name"] and layout.delimiter == "xlsx"
    assert [(r.line, r.problem) for r in got] == [
        (2, None),
        (4, "has cells beyond the header's 2 columns"),
        (5, None),
    ]
    assert got[0].values["toPhone"] == "380671234567" and got[2].values["Name"] == "7.5"
    old = write(tmp_path / "old.xls", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\x00" * 64)
    with pytest.raises(CampaignError, match=r"old Excel \.xls workbook; save it as \.xlsx"):
        read_rows(old, Defaults())
    broken = write(tmp_path / "broken.xlsx", b"PK\x03\x04 not really a zip")
    with pytest.raises(CampaignError, match=r"not a readable \.xlsx workbook"):
        read_rows(broken, Defaults())


# --- launches on real databases ------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def settings(
    request: pytest.FixtureRequest, database_factory: Callable[[str], str], redis_db: str
) -> Settings:
    return Settings(DATABASE_URL=database_factory(request.param), BROKER_URL=redis_db)  # type: ignore[call-arg]


def test_launch_streams_rejects_bad_rows_and_resumes(tmp_path: Path, settings: Settings) -> None:
    path = big_file(tmp_path / "contacts.csv", 5000)

    first = launch(path, "spring", DEFAULTS, settings)

    assert (first.rows, first.accepted, first.rejected, first.duplicate) == (5000, 4500, 500, 0)
    assert first.rejected_file == str(tmp_path / "contacts.rejected.csv")
    with open(first.rejected_file, newline="") as handle:
        rejected = list(csv.DictReader(handle))
    assert len(rejected) == 500
    assert rejected[0]["line"] == "11" and rejected[0]["field"] == "toPhone"
    assert [int(r["line"]) for r in rejected] == sorted(int(r["line"]) for r in rejected)
    assert count(settings.database_url, "spring") == 4500

    again = launch(path, "spring", DEFAULTS, settings)

    assert (again.accepted, again.duplicate, again.rejected) == (0, 4500, 500)
    assert count(settings.database_url, "spring") == 4500


def test_an_interrupted_launch_is_finished_by_launching_again(
    tmp_path: Path, settings: Settings
) -> None:
    full = big_file(tmp_path / "full.csv", 3000, bad_every=1000)
    lines = full.read_text().splitlines(keepends=True)
    partial = write(tmp_path / "partial.csv", "".join(lines[:1201]))
    launch(partial, "resume", DEFAULTS, settings)  # as if stopped after 1200 rows
    assert count(settings.database_url, "resume") == 1199

    done = launch(full, "resume", DEFAULTS, settings)

    assert done.duplicate == 1199 and done.accepted == 3000 - 3 - 1199
    assert count(settings.database_url, "resume") == 2997


def test_dry_run_validates_without_enqueueing(tmp_path: Path, settings: Settings) -> None:
    stats = launch(big_file(tmp_path / "c.csv", 200), "dry", DEFAULTS, settings, dry_run=True)

    assert (stats.accepted, stats.rejected) == (180, 20)
    assert count(settings.database_url, "dry") == 0


def test_a_dry_run_of_a_relaunch_counts_what_is_already_stored_as_known(
    tmp_path: Path, settings: Settings
) -> None:
    """A dry run says what the launch would do: rows already stored are `already known`,
    not `would enqueue` (it said 'would enqueue 1,199, 0 already known' here)."""
    full = big_file(tmp_path / "full.csv", 1500, bad_every=1000)
    lines = full.read_text().splitlines(keepends=True)
    launch(write(tmp_path / "part.csv", "".join(lines[:1201])), "rel", DEFAULTS, settings)

    dry = launch(full, "rel", DEFAULTS, settings, dry_run=True)
    done = launch(full, "rel", DEFAULTS, settings)

    assert (dry.accepted, dry.duplicate, dry.rejected) == (1500 - 1 - 1199, 1199, 1)
    assert (done.accepted, done.duplicate, done.rejected) == (dry.accepted, 1199, 1)
    assert dry.estimate.messages == done.estimate.messages == dry.accepted


def test_an_operator_list_with_a_default_region(tmp_path: Path, settings: Settings) -> None:
    path = write(tmp_path / "people.csv", ("\ufeff" + OPERATOR_LIST).encode())

    stats = launch(path, "ua-list", MAPPED, settings)

    assert (stats.rows, stats.accepted, stats.rejected, stats.renumbered) == (5, 3, 2, 2)
    with get_engine(settings.database_url).connect() as conn:
        phones = conn.execute(
            select(messages.c.to_phone, messages.c.text)
            .where(messages.c.campaign == "ua-list")
            .order_by(messages.c.to_phone)
        ).all()
    assert [tuple(p) for p in phones] == [
        ("+380671234567", "Hi Olena"),
        ("+380671234568", "Hi Taras"),
        ("+380671234569", "Hi Ivan"),
    ]
    with open(tmp_path / "people.rejected.csv", newline="", encoding="utf-8") as handle:
        rejected = list(csv.DictReader(handle))
    assert [(r["line"], r["field"], r["toPhone"], r["changed"]) for r in rejected] == [
        ("5", "toPhone", "067 12", ""),
        ("6", "toPhone", "3.80671E+11", ""),
    ]
    assert rejected[0]["reason"].startswith("is not a valid UA number (national, or with its")
    assert "scientific notation" in rejected[1]["reason"]


def test_the_rejects_file_says_what_the_region_changed(tmp_path: Path, settings: Settings) -> None:
    path = write(tmp_path / "c.csv", "phone,name\n067 123 4567,Olena\n")
    stats = launch(path, "changed", replace(MAPPED, message_type="nope"), settings)
    assert stats.rejected == 1
    with open(tmp_path / "c.rejected.csv", newline="", encoding="utf-8") as handle:
        (row,) = csv.DictReader(handle)
    assert row["field"] == "messageType"
    assert row["changed"] == "toPhone '067 123 4567' read as +380671234567 (region UA)"


def test_a_cancelled_campaign_never_retries_nor_resends(settings: Settings) -> None:
    from worker.flows.dispatcher import Retry, Unknown, claim, record
    from worker.flows.producer import enqueue

    engine = get_engine(settings.database_url)
    enqueue(make_messages(2, "halt"), "halt", settings=settings, kick=False)
    rows = claim(engine, "standard", utcnow(), 10, 60, "tok")
    cancel_campaign(engine, "halt")  # both are in flight: not cancelled yet
    failed_send, lost_answer = sorted(r.pk for r in rows)

    record(
        engine,
        "tok",
        [Retry(failed_send, "HTTP 500", True), Unknown(lost_answer, "ReadTimeout")],
        {r.pk: r for r in rows},
        settings,
    )

    with engine.connect() as conn:
        after = {
            r.pk: (r.state, r.unknown_outcomes, r.error_code)
            for r in conn.execute(select(messages))
        }
    assert after[failed_send] == ("cancelled", 0, "CANCELLED")
    assert after[lost_answer] == ("failed", 1, "UNKNOWN_OUTCOME")  # counted, never resent


def test_a_cancel_between_the_campaign_check_and_the_insert_still_wins(
    settings: Settings,
) -> None:
    from worker.flows.producer import enqueue, row_for, store

    engine = get_engine(settings.database_url)
    enqueue(make_messages(1, "race"), "race", settings=settings, kick=False)  # the campaign
    cancel_campaign(engine, "race")
    late = validate_message(make_messages(1, "race", start=1)[0], now=utcnow())
    assert not isinstance(late, list)

    with pytest.raises(CampaignCancelled):  # as if ensure_campaign had run just before
        store(engine, [row_for(late, "race", utcnow(), settings)], "race")
    assert count(settings.database_url, "race") == 1


def test_cancelled_campaign_takes_no_new_messages(settings: Settings) -> None:
    from worker.flows.producer import enqueue

    enqueue(make_messages(3, "gone"), "gone", settings=settings, kick=False)
    result = cancel_campaign(get_engine(settings.database_url), "gone")
    assert result is not None and result["cancelled_now"] == 3

    with pytest.raises(CampaignCancelled, match="'gone' was cancelled"):
        enqueue(make_messages(1, "gone-2"), "gone", settings=settings, kick=False)
    assert cancel_campaign(get_engine(settings.database_url), "nope") is None


# --- with a running worker -----------------------------------------------------------


def _cli(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "worker.ops.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=timeout,
    )


def test_cancel_stops_unsent_messages_and_leaves_sent_ones(
    stack: Stack, sim, campaign: str
) -> None:
    stack.enqueue(make_messages(50, campaign), campaign)
    stack.wait_final(campaign, 50)
    sim.configure(api_key="rotated-key")  # later messages stay queued
    stack.enqueue(make_messages(200, campaign, start=50), campaign)
    env = {"DATABASE_URL": stack.settings.database_url, "BROKER_URL": stack.settings.broker_url}

    done = _cli("campaign", "cancel", campaign, "--json", env=env)

    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    # Unsent ones are cancelled now, or (mid-claim: the circuit's probe) as soon as their
    # send comes back, which may be before the counts are read.
    assert result["cancelled"] + result["in_flight"] == 200
    assert result["cancelled_now"] >= 200 - 10 - result["in_flight"]  # all but the probe
    assert result["final_before"] == 50 and result["with_provider"] == 0
    sim.configure(api_key="test-key")
    report = stack.wait_final(campaign, 250)
    assert report["states"]["cancelled"] == 200
    assert sim.stats()["unique_tracking_ids"] == 50
    listing = json.loads(_cli("campaign", "list", "--json", env=env).stdout)
    mine = next(c for c in listing if c["campaign"] == campaign)
    assert mine["total"] == 250 and mine["cancelled_at"]


def test_launch_and_watch_from_the_command_line(
    stack: Stack, sim, tmp_path: Path, campaign
) -> None:
    path = big_file(tmp_path / "people.csv", 300)
    env = {"DATABASE_URL": stack.settings.database_url, "BROKER_URL": stack.settings.broker_url}

    launched = _cli(
        "campaign",
        "launch",
        str(path),
        "--name",
        campaign,
        "--from-name",
        "Shop",
        "--type",
        "promo",
        "--text",
        "Hi {name}, code {code}",
        env=env,
    )

    assert launched.returncode == 0, launched.stderr
    assert "300 rows, enqueued 270, 0 already known, 30 rejected" in launched.stdout
    assert "people.rejected.csv" in launched.stdout
    watched = _cli("campaign", "status", campaign, "--watch", "--interval", "0.2", env=env)
    assert watched.returncode == 0, watched.stderr
    assert "every message is final" in watched.stdout
    report = stack.wait_final(campaign, 270, timeout=5)
    assert report["total"] == 270


def test_launch_refuses_bad_files_without_a_traceback(tmp_path: Path) -> None:
    env = {"DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}"}
    bad_name = _cli("campaign", "launch", "x.csv", "--name", " ", env=env)
    assert bad_name.returncode != 0 and "campaign must be a non-empty string" in bad_name.stderr
    cases = {
        "missing.csv": None,
        "empty.csv": b"",
        "nophone.csv": b"id,text\n1,hi\n",
    }
    for name, content in cases.items():
        if content is not None:
            write(tmp_path / name, content)
        done = _cli("campaign", "launch", str(tmp_path / name), "--name", "x", env=env)
        assert done.returncode != 0
        assert "Traceback" not in done.stderr and "Error:" in done.stderr


def test_an_interrupted_launch_says_what_was_stored_and_how_to_finish(
    tmp_path: Path, database_factory: Callable[[str], str]
) -> None:
    import signal
    import time

    url = database_factory("postgresql")
    path = big_file(tmp_path / "many.csv", 30_000, bad_every=10**9)
    env = {**os.environ, "DATABASE_URL": url, "BROKER_URL": "redis://127.0.0.1:6379/15"}
    args = [
        sys.executable,
        "-m",
        "worker.ops.cli",
        "campaign",
        "launch",
        str(path),
        "--name",
        "cut",
    ]
    args += ["--from-name", "Shop", "--type", "promo", "--text", "Hi {name}"]
    process = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while count(url, "cut") == 0:
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.05)

    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)

    stored = count(url, "cut")
    assert process.returncode == 130, err.decode()
    assert 0 < stored < 30_000
    text = " ".join(out.decode().split())  # rich wraps long lines
    assert "launch interrupted after" in text and f"{stored:,} messages of campaign cut" in text
    assert "launch the same file under the same name again" in text
    finished = launch(path, "cut", DEFAULTS, Settings(DATABASE_URL=url))  # type: ignore[call-arg]
    assert finished.duplicate == stored and count(url, "cut") == 30_000


@pytest.mark.parametrize("hold", [False, True])
def test_an_interrupted_held_launch_does_not_say_its_messages_will_be_sent(
    tmp_path: Path, settings: Settings, monkeypatch: pytest.MonkeyPatch, hold: bool
) -> None:
    from rich.console import Console

    from worker.ops import cli

    launch(big_file(tmp_path / "h.csv", 10, bad_every=10**9), "h", DEFAULTS, settings, hold=hold)
    monkeypatch.setattr(cli, "_engine", lambda *_: get_engine(settings.database_url))
    monkeypatch.setattr(cli, "console", Console(record=True, width=300))
    with pytest.raises(SystemExit) as stop:
        cli._interrupted("h", tmp_path / "h.csv", None, KeyboardInterrupt(), hold=hold)

    said = cli.console.export_text()
    assert stop.value.code == 130 and "10 messages of campaign h are stored" in said
    if hold:
        assert "held (sent once `cascade campaign approve h`)" in said
        assert "will be sent" not in said
    else:
        assert "are stored and will be sent" in said


def test_dedupe_skips_a_phone_already_in_the_campaign_or_the_file(
    tmp_path: Path, settings: Settings
) -> None:
    first = write(tmp_path / "a.csv", "phone,name\n+380671234567,a\n067 123 4568,b\n")
    defaults = replace(MAPPED, dedupe=True)
    assert launch(first, "dd", defaults, settings).accepted == 2
    second = write(
        tmp_path / "b.csv",
        "phone,name\n"
        "380671234567,same as a.csv line 2\n"
        "+380671234569,new\n"
        "0671234569,new again in this file\n"
        "067 12,bad\n",
    )

    stats = launch(second, "dd", defaults, settings)

    assert (stats.accepted, stats.deduped, stats.rejected) == (1, 2, 1)
    assert count(settings.database_url, "dd") == 3
    again = launch(first, "dd", defaults, settings)  # a relaunch: already known, not deduped
    assert (again.accepted, again.duplicate, again.deduped) == (0, 2, 0)


def test_dedupe_sees_the_chunk_before_stored_across_a_chunk_boundary(
    tmp_path: Path, settings: Settings
) -> None:
    """A launch reads the next chunk while the server takes one in, but not with --dedupe:
    a phone in the last row of one chunk and the first of the next is enqueued once."""
    from worker.flows.launch import CHUNK

    phones = [f"+38067{i:07d}" for i in range(CHUNK)] + ["+380670000999", "+380679999999"]
    source = write(tmp_path / "edge.csv", "phone,name\n" + "".join(f"{p},x\n" for p in phones))

    stats = launch(source, "edge", replace(MAPPED, dedupe=True), settings)

    assert (stats.rows, stats.accepted, stats.deduped) == (CHUNK + 2, CHUNK + 1, 1)
    assert count(settings.database_url, "edge") == CHUNK + 1
