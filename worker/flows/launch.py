"""Launching a campaign from a CSV or Excel file, and retrying one.

A launch streams the file in chunks, so a million rows use the memory of two chunks (one
is read while the one before is stored).
Ids are either the file's own or derived from the campaign name, the line and the phone,
so launching the same file again under the same name enqueues nothing twice and resumes
a launch that was interrupted.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import re
import string
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, Any

from sqlalchemy import Engine, select, update
from sqlalchemy.exc import DBAPIError

from config import Settings
from worker.core.estimate import Estimate
from worker.core.quiet import checked_window, place
from worker.core.states import State
from worker.core.validation import (
    FIELDS,
    FieldError,
    OutgoingMessage,
    campaign_callbacks,
    region_problem,
    validate_message,
    with_region,
)
from worker.flows.campaigns import (
    CampaignError,
    campaign_window,
    ensure_campaign,
    hold_campaign,
    set_limits,
)
from worker.flows.consent import listed
from worker.flows.producer import (
    Enqueued,
    check_campaign,
    chunked,
    enqueue,
    enqueue_chunks,
    rules_from,
)
from worker.flows.wake import wake_dispatcher
from worker.store.db import among, get_engine, utcnow
from worker.store.models import campaigns, messages

log = logging.getLogger(__name__)

API_COLUMNS = FIELDS  # CSV headers are the message fields, matched case-insensitively
_CANONICAL = {name.lower(): name for name in API_COLUMNS}
_API_FIELDS = frozenset(API_COLUMNS)
CHUNK = 1000
SNIFF_BYTES = 64 * 1024


# --- reading a CSV file --------------------------------------------------------------


@dataclass(frozen=True)
class Defaults:
    """Values for columns the file lacks or leaves empty (`--from-name`, `--type`, …)."""

    from_name: str | None = None
    message_type: str | None = None
    ttl: int | None = None
    route: str | None = None
    text: str | None = None  # a template: "Hi {name}, your code {code}"
    callback_url: str | None = None  # for the whole campaign (issue: outcome callbacks)
    callback_task: str | None = None
    region: str | None = None  # `--default-region UA`: national numbers read as Ukrainian
    columns: tuple[tuple[str, str], ...] = ()  # `--column phone=toPhone`: header -> field
    dedupe: bool = False  # `--dedupe`: skip a phone already in the campaign (or the file)
    # `--send-window 09:00-20:00` (or `off`/`none`): the campaign's quiet hours, stored with it
    send_window: str | None = None


def column_mapping(specs: Iterable[str]) -> tuple[tuple[str, str], ...]:
    """`--column HEADER=FIELD` options, checked: the field must be one of the API's."""
    mapping: dict[str, str] = {}
    for spec in specs:
        header, equals, target = (part.strip() for part in spec.partition("="))
        if not (equals and header and target):
            raise CampaignError(f"--column {spec!r} must be HEADER=FIELD, like phone=toPhone")
        field_name = _CANONICAL.get(target.lower())
        if field_name is None:
            raise CampaignError(
                f"--column {spec!r} maps to an unknown field {target!r}; "
                f"the fields are: {', '.join(API_COLUMNS)}"
            )
        if header.lower() in mapping:
            raise CampaignError(f"--column maps the column {header!r} twice")
        mapping[header.lower()] = field_name
    return tuple(mapping.items())


@dataclass(frozen=True)
class Row:
    line: int
    values: dict[str, str]
    problem: str | None = None  # set when the line could not even be read


@dataclass
class CsvLayout:
    columns: list[str]  # canonical API names where they match, else as written
    ignored: list[str]
    delimiter: str  # "xlsx" for a workbook
    renamed: dict[str, str] = field(default_factory=dict)  # field -> the header it came from


def _decode_lines(raw: IO[bytes], bad: set[int]) -> Iterator[str]:
    """Decode line by line, so one badly encoded line costs one row, not the file."""
    for number, line in enumerate(raw, start=1):
        if number == 1 and line.startswith(b"\xef\xbb\xbf"):
            line = line[3:]
        try:
            yield line.decode("utf-8")
        except UnicodeDecodeError:
            bad.add(number)
            yield line.decode("utf-8", errors="replace")


def _binary(head: bytes) -> bool:
    """NULs in the header line (UTF-16, zip/xlsx) or everywhere (images) mean not a text
    file; a stray NUL in one data row costs that row only (validation refuses it)."""
    first_line = head.partition(b"\n")[0]
    return b"\x00" in first_line or head.count(b"\x00") * 10 > len(head)


_SEP_LINE = re.compile(r"sep=(.)\s*")  # Excel writes and reads a first line "sep=;"
XLSX_MAGIC = b"PK\x03\x04"
XLS_MAGIC = b"\xd0\xcf\x11\xe0"


def _sniff(path: Path) -> tuple[str, bool]:
    """The file's delimiter, and whether its first line is Excel's `sep=` line."""
    with path.open("rb") as raw:
        head = raw.read(SNIFF_BYTES)
    if not head.strip():
        raise CampaignError(f"{path} is empty")
    if head.startswith(XLS_MAGIC):
        raise CampaignError(
            f"{path} is an old Excel .xls workbook; save it as .xlsx or CSV UTF-8 and launch that"
        )
    if _binary(head):
        raise CampaignError(f"{path} is not a CSV text file (it contains binary data)")
    sample = head.decode("utf-8", errors="replace").lstrip("\ufeff")
    first = sample.splitlines()[0] if sample.splitlines() else sample
    if sep := _SEP_LINE.fullmatch(first):
        return sep[1], True
    try:
        return csv.Sniffer().sniff(first, delimiters=",;\t|").delimiter, False
    except csv.Error:
        return ",", False


def template_fields(template: str) -> list[str]:
    try:
        return [name for _, name, _, _ in string.Formatter().parse(template) if name]
    except ValueError as exc:
        raise CampaignError(f"--text template is malformed: {exc}") from None


def read_layout(header: list[str], defaults: Defaults, delimiter: str) -> CsvLayout:
    written = [h.strip().lstrip("\ufeff").strip() for h in header]
    mapping = dict(defaults.columns)
    found = {h.lower() for h in written}
    for source, target in mapping.items():
        if source not in found:
            raise CampaignError(
                f"--column {source}={target}: the file has no column {source!r} "
                f"(found: {', '.join(h for h in written if h)})"
            )
    columns = [mapping.get(h.lower()) or _CANONICAL.get(h.lower(), h) for h in written]
    renamed = {mapping[h.lower()]: h for h in written if h.lower() in mapping}
    if not any(columns):
        raise CampaignError("the header row is empty")
    duplicates = sorted({c for c in columns if columns.count(c) > 1 and c})
    if duplicates:
        raise CampaignError(f"the header repeats columns: {', '.join(duplicates)}")
    if "toPhone" not in columns:
        raise CampaignError(
            f"the header has no toPhone column (found: {', '.join(columns)}); "
            f"the columns are the cascade API's field names: {', '.join(API_COLUMNS)}, "
            "or map yours with --column, like --column phone=toPhone"
        )
    used = set(template_fields(defaults.text)) if defaults.text else set()
    known = {c.lower() for c in [*columns, *renamed.values()]}
    missing = sorted(u for u in used if u.lower() not in known)
    if missing:
        raise CampaignError(f"--text uses columns the file does not have: {', '.join(missing)}")
    used_folded = {u.lower() for u in used}  # `{name}` fills from a column headed `Name`
    ignored = [c for c in columns if c and c not in API_COLUMNS and c.lower() not in used_folded]
    return CsvLayout(columns, ignored, delimiter, renamed)


def read_rows(path: Path, defaults: Defaults) -> tuple[CsvLayout, Iterator[Row]]:
    """The file's layout (checked now) and its rows (read lazily): CSV in any of the forms
    Excel and other tools write, or an .xlsx workbook's first sheet."""
    if not path.is_file():
        raise CampaignError(f"{path}: no such file")
    with path.open("rb") as probe:
        if probe.read(4) == XLSX_MAGIC:
            return read_xlsx(path, defaults)
    delimiter, sep_line = _sniff(path)
    raw = path.open("rb")
    bad: set[int] = set()
    reader = csv.reader(_decode_lines(raw, bad), delimiter=delimiter)
    try:
        if sep_line:
            next(reader)
        header = next(reader)
    except StopIteration:
        raw.close()
        raise CampaignError(f"{path} is empty") from None
    except csv.Error as exc:
        raw.close()
        raise CampaignError(f"{path} is not readable as CSV: {exc}") from None
    layout = read_layout(header, defaults, delimiter)
    return layout, _rows(reader, raw, layout, bad)


def _rows(reader: Any, raw: IO[bytes], layout: CsvLayout, bad: set[int]) -> Iterator[Row]:
    try:
        start = reader.line_num + 1
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield Row(start, {}, f"not readable as CSV: {exc}")
                start = reader.line_num + 1
                continue
            end = reader.line_num
            line, start = start, end + 1
            if not "".join(cells).strip():
                continue  # blank line
            if bad and bad.intersection(range(line, end + 1)):
                yield Row(line, {}, "not valid UTF-8; save the file as UTF-8")
                continue
            if len(cells) > len(layout.columns):
                yield Row(line, {}, f"has {len(cells)} cells, the header {len(layout.columns)}")
                continue
            if len(cells) < len(layout.columns):  # Excel drops trailing cells
                cells += [""] * (len(layout.columns) - len(cells))
            yield Row(line, _values(layout, cells))
    finally:
        raw.close()


def _values(layout: CsvLayout, cells: list[str]) -> dict[str, str]:
    """A row's cells by field; a mapped column is also there under its own header, so a
    --text template may use either name."""
    values = dict(zip(layout.columns, cells, strict=True))
    for target, header in layout.renamed.items():
        values.setdefault(header, values[target])
    return values


# --- reading an .xlsx workbook -------------------------------------------------------


def read_xlsx(path: Path, defaults: Defaults) -> tuple[CsvLayout, Iterator[Row]]:
    """The first sheet, streamed (openpyxl read-only: one row in memory at a time); lines
    are the sheet's row numbers, as Excel shows them."""
    import zipfile

    from openpyxl import load_workbook

    try:
        book = load_workbook(path, read_only=True, data_only=True)
    except (zipfile.BadZipFile, KeyError, OSError, ValueError) as exc:
        raise CampaignError(f"{path} is not a readable .xlsx workbook: {exc}") from None
    sheet = book.worksheets[0] if book.worksheets else None
    if sheet is None:
        book.close()
        raise CampaignError(f"{path} has no worksheet")
    cells = sheet.iter_rows(values_only=True)
    try:
        header = next(cells)
    except StopIteration:
        book.close()
        raise CampaignError(f"{path}: the first sheet is empty") from None
    width = len(header)
    while width and header[width - 1] is None:  # trailing empty header cells
        width -= 1
    layout = read_layout([_cell_text(c) for c in header[:width]], defaults, "xlsx")
    return layout, _xlsx_rows(book, cells, layout)


def _xlsx_rows(book: Any, cells: Iterator[tuple[Any, ...]], layout: CsvLayout) -> Iterator[Row]:
    width = len(layout.columns)
    try:
        for line, values in enumerate(cells, start=2):
            text = [_cell_text(v) for v in values]
            if not any(t.strip() for t in text):
                continue
            if any(t.strip() for t in text[width:]):
                yield Row(line, {}, f"has cells beyond the header's {width} columns")
                continue
            text = (text + [""] * width)[:width]
            yield Row(line, _values(layout, text))
    finally:
        book.close()


def _cell_text(value: Any) -> str:
    """A cell as the text a CSV export would hold; a phone typed as a number keeps its digits
    (380671234567, not 380671234567.0)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


# --- rows to messages (pure) ---------------------------------------------------------


class _Folded(dict[str, str]):
    """Template lookups ignore case: {name} fills from a column headed Name."""

    def __missing__(self, key: str) -> str:
        for name, value in self.items():
            if name.lower() == key.lower():
                return value
        raise KeyError(key)


_ID_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def generated_id(campaign: str, line: int, phone: str) -> str:
    """Stable for the same file and name: re-launching enqueues nothing twice."""
    slug = _ID_UNSAFE.sub("-", campaign).strip("-")[:80] or "campaign"
    digest = hashlib.sha1(f"{campaign}\x00{line}\x00{phone}".encode()).hexdigest()[:10]
    return f"{slug}-{line}-{digest}"


def to_message(row: Row, defaults: Defaults, campaign: str) -> dict[str, Any]:
    """The cascade API object for one CSV row; type problems are left to validation."""
    message: dict[str, Any] = {
        k: stripped
        for k, v in row.values.items()
        if k in _API_FIELDS and (stripped := v.strip()) != ""
    }
    for key, default in (
        ("fromName", defaults.from_name),
        ("messageType", defaults.message_type),
        ("ttl", defaults.ttl),
        ("route", defaults.route),
        ("phoneRegion", defaults.region),
    ):
        if key not in message and default is not None:
            message[key] = default
    if "text" not in message and defaults.text:
        message["text"] = defaults.text.format_map(_Folded(row.values))
    for number in ("ttl", "callbackLateAfter"):  # CSV cells are text; validation wants ints
        if isinstance(message.get(number), str) and message[number].isdecimal():
            message[number] = int(message[number])
    if "surveyOptions" in message:
        message["surveyOptions"] = [o.strip() for o in message["surveyOptions"].split("|")]
    if "id" not in message:
        message["id"] = generated_id(campaign, row.line, message.get("toPhone", ""))
    return message


# --- the launch ----------------------------------------------------------------------


@dataclass
class LaunchStats:
    rows: int = 0
    accepted: int = 0
    duplicate: int = 0
    rejected: int = 0
    renumbered: int = 0  # phones read as E.164 with the default region
    deduped: int = 0  # --dedupe: rows skipped, their phone already in the campaign
    estimate: Any = None  # worker.core.estimate.Estimate over the accepted messages
    ignored_columns: list[str] = field(default_factory=list)
    rejected_file: str | None = None
    # Consent (worker/flows/consent.py, worker/core/quiet.py): refused by the suppression list, held
    # for the recipient's send window, expired because the window opens after their TTL.
    suppressed: int = 0
    waiting_for_window: int = 0
    expired_by_window: int = 0


REJECT_COLUMNS = ("line", "field", "reason", "id", "toPhone", "changed")


def phone_change(message: dict[str, Any], region: str | None) -> str:
    """What the default region made of the row's phone, for the rejects file ('' if nothing)."""

    phone = message.get("toPhone")
    region = message.get("phoneRegion") or region
    if not isinstance(phone, str) or not isinstance(region, str) or region_problem(region):
        return ""
    read = with_region(phone, region)
    if read == phone:
        return ""
    return f"toPhone {phone!r} read as {read} (region {region.upper()})"


def rejected_path(path: Path) -> Path:
    """`contacts.csv` → `contacts.rejected.csv`; `contacts.xlsx` → `contacts.xlsx.rejected.csv`
    (so a workbook and its CSV export never overwrite each other's rejects)."""
    if path.suffix.lower() == ".csv":
        return path.with_name(f"{path.stem}.rejected.csv")
    return path.with_name(f"{path.name}.rejected.csv")


def launch(
    path: Path,
    name: str,
    defaults: Defaults,
    settings: Settings,
    *,
    dry_run: bool = False,
    hold: bool = False,
    limits: tuple[int | None, float | None] = (None, None),
    progress: Callable[[LaunchStats], None] | None = None,
) -> LaunchStats:
    """Validate and enqueue every row; write refused rows beside the file; never stop early.

    `hold`: the campaign is held for approval before the first row is stored, so nothing
    is sent until `approve_campaign`.
    """

    check_campaign(name)
    campaign_callbacks(defaults.callback_url, defaults.callback_task)  # refuse bad flags first
    window = send_window_option(defaults.send_window)
    layout, rows = read_rows(path, defaults)
    if hold and not dry_run:
        hold_campaign(get_engine(settings.database_url), name, create=True)
    if limits != (None, None) and not dry_run:  # metered from its first message on
        ensure_campaign(get_engine(settings.database_url), name)
        set_limits(get_engine(settings.database_url), name, *limits)
    if window is not None and not dry_run:  # stored before the first row: every row has it
        ensure_campaign(get_engine(settings.database_url), name)
        campaign_window(get_engine(settings.database_url), name, window, "--send-window")
    stats = LaunchStats(ignored_columns=layout.ignored, estimate=Estimate())
    if progress:
        progress(stats)  # the caller holds the figures even if the first chunk is cut short
    woken = False
    out_path = rejected_path(path)
    with out_path.open("w", newline="", encoding="utf-8") as out:
        rejects = csv.writer(out)
        rejects.writerow(REJECT_COLUMNS)
        for refusals in _settled(rows, defaults, name, settings, stats, dry_run):
            for line, field_name, reason, message in refusals:
                rejects.writerow(
                    (
                        line,
                        field_name,
                        reason,
                        message.get("id", ""),
                        message.get("toPhone", ""),
                        phone_change(message, settings.default_phone_region),
                    )
                )
            if progress:
                progress(stats)
            if not dry_run and stats.accepted and not woken:
                wake_dispatcher(settings.broker_url)  # beat and chained sends do the rest
                woken = True
    if stats.rejected:
        stats.rejected_file = str(out_path)
    else:
        out_path.unlink()
    return stats


def preview(
    engine: Engine,
    valid: list[Any],
    campaign: str | None,
    settings: Settings,
    window: str | None = None,
) -> dict[str, int]:
    """What a dry run would meet: messages the suppression list refuses, and those quiet
    hours hold (or expire), for `campaign launch --dry-run`; `window` is the campaign's
    window the launch would set (else the one it has)."""
    now = utcnow()
    types = settings.suppressed_types
    with engine.connect() as conn:
        on = listed(conn, (m.to_phone for m in valid if m.message_type in types))
        own = window
        if campaign is not None and window is None:
            own = conn.execute(
                select(campaigns.c.send_window).where(campaigns.c.name == campaign)
            ).scalar()
    counts = {"suppressed": 0, "waiting_for_window": 0, "expired_by_window": 0}
    windows = settings.windows
    for message in valid:
        if message.message_type in types and message.to_phone in on:
            counts["suppressed"] += 1
            continue
        row = {
            "to_phone": message.to_phone,
            "scheduled_sent": message.scheduled_sent,
            "expires_at": None,
            "available_at": now,
            "window_at": None,
        }
        start = max(now, message.scheduled_sent) if message.scheduled_sent else now
        if message.ttl:
            row["expires_at"] = start + timedelta(seconds=message.ttl)
        rule = windows.for_message(message.message_type, own)
        if place(row, rule, now, settings):
            counts["expired_by_window"] += 1
        elif row["window_at"] is not None:
            counts["waiting_for_window"] += 1
    return counts


def send_window_option(text: str | None) -> str | None:
    """`--send-window` checked and normalised (`none` is `off`); CampaignError names it."""
    if text is None:
        return None
    try:
        return checked_window(text, "--send-window")
    except ValueError as exc:
        raise CampaignError(str(exc)) from None


def _consent_preview(
    stats: LaunchStats, valid: list[Any], name: str, settings: Settings, window: str | None
) -> None:
    try:
        counts = preview(get_engine(settings.database_url), valid, name, settings, window)
    except DBAPIError:  # a dry run needs no database: without one, nothing to count
        return
    stats.suppressed += counts["suppressed"]
    stats.waiting_for_window += counts["waiting_for_window"]
    stats.expired_by_window += counts["expired_by_window"]


def _stored_ids(settings: Settings, ids: list[str]) -> set[str]:
    """Those of `ids` already stored; none when there is no database (a dry run needs none)."""
    if not ids:
        return set()
    try:
        with get_engine(settings.database_url).connect() as conn:
            return set(conn.scalars(select(messages.c.id).where(among(conn, messages.c.id, ids))))
    except DBAPIError:
        return set()


def _dedupe(
    readable: list[Row],
    messages_: list[dict[str, Any]],
    name: str,
    settings: Settings,
    now: datetime,
    rules: Any,
    stats: LaunchStats,
) -> set[int]:
    """The lines to keep under --dedupe: a row whose phone (as it would be sent, in E.164)
    is already in the campaign, or earlier in the file, is skipped. A row whose own id is
    stored goes on (a relaunch: it counts as already known). Invalid rows go on, to be
    rejected with their reasons."""

    phones: dict[int, tuple[str, str]] = {}
    for row, message in zip(readable, messages_, strict=True):
        valid = validate_message(message, now=now, rules=rules)
        if not isinstance(valid, list):
            phones[row.line] = (valid.to_phone, valid.id)
    wanted = sorted({phone for phone, _ in phones.values()})
    owners: dict[str, set[str]] = {}
    if wanted:
        with get_engine(settings.database_url).connect() as conn:
            for phone, message_id in conn.execute(
                select(messages.c.to_phone, messages.c.id).where(
                    among(conn, messages.c.to_phone, wanted), messages.c.campaign == name
                )
            ):
                owners.setdefault(phone, set()).add(message_id)
    keep: set[int] = set()
    for row in readable:
        if row.line not in phones:
            keep.add(row.line)
            continue
        phone, message_id = phones[row.line]
        taken = owners.setdefault(phone, set())
        if taken and message_id not in taken:
            stats.deduped += 1
            continue
        taken.add(message_id)
        keep.add(row.line)
    return keep


Refusal = tuple[int, str, str, dict[str, Any]]  # line, field, reason, the row's message


def _settled(
    rows: Iterable[Row],
    defaults: Defaults,
    name: str,
    settings: Settings,
    stats: LaunchStats,
    dry_run: bool,
) -> Iterator[list[Refusal]]:
    """Validate (and unless a dry run, enqueue) the rows a chunk at a time; yield each
    chunk's refusals in line order once it is counted in `stats` (and stored).

    One `enqueue_chunks` serves the whole launch: the campaign is set up once, and each
    chunk's answers carry its accepted messages as validated (for the estimate) and how
    many wait for their send window, so neither is asked again. The next chunk is read and
    checked while the server takes one in (`enqueue_chunks`); with --dedupe, only once the
    chunk before it is stored."""
    read: deque[tuple[list[Row], list[Row], list[dict[str, Any]]]] = deque()  # in file order

    def messages_of_chunks() -> Iterator[list[dict[str, Any]]]:
        for chunk in chunked(rows, CHUNK):
            stats.rows += len(chunk)
            read.append((chunk, *_messages(chunk, defaults, name, settings, stats)))
            yield read[-1][2]

    if dry_run:
        for messages_ in messages_of_chunks():
            chunk, readable, _ = read.popleft()
            errors = _dry_run(messages_, name, defaults, settings, stats)
            yield list(_refusals(chunk, readable, messages_, errors, stats, settings))
        return
    for done in enqueue_chunks(
        messages_of_chunks(),
        name,
        settings=settings,
        callback_url=defaults.callback_url,
        callback_task=defaults.callback_task,
        read_ahead=not defaults.dedupe,  # --dedupe looks the stored campaign up per chunk
    ):
        chunk, readable, messages_ = read.popleft()
        errors = _count(done, stats, settings)
        yield list(_refusals(chunk, readable, messages_, errors, stats, settings))


def _messages(
    chunk: list[Row], defaults: Defaults, name: str, settings: Settings, stats: LaunchStats
) -> tuple[list[Row], list[dict[str, Any]]]:
    """A chunk's readable rows and their messages (those --dedupe keeps)."""
    readable = [r for r in chunk if r.problem is None]
    messages_ = [to_message(r, defaults, name) for r in readable]
    if defaults.dedupe:
        now, rules = utcnow(), rules_from(settings)
        kept = _dedupe(readable, messages_, name, settings, now, rules, stats)
        chunk[:] = [r for r in chunk if r.problem is not None or r.line in kept]
        pairs = [(r, m) for r, m in zip(readable, messages_, strict=True) if r.line in kept]
        readable, messages_ = [r for r, _ in pairs], [m for _, m in pairs]
    return readable, messages_


Errors = list[list[FieldError] | None]  # per message: its problems, or None if it passed


def _dry_run(
    messages_: list[dict[str, Any]],
    name: str,
    defaults: Defaults,
    settings: Settings,
    stats: LaunchStats,
) -> Errors:
    """Count what enqueueing would do, storing nothing."""
    now, rules, card = utcnow(), rules_from(settings), settings.rates
    checked = [validate_message(m, now=now, rules=rules) for m in messages_]
    errors: Errors = [c if isinstance(c, list) else None for c in checked]
    # What the launch would answer `duplicate`: an id already stored (a relaunch), or
    # one repeated earlier in the chunk. Neither is enqueued, estimated nor counted.
    known = _stored_ids(settings, [c.id for c in checked if not isinstance(c, list)])
    accepted: list[OutgoingMessage] = []
    for outcome in checked:
        if isinstance(outcome, list):
            continue
        if outcome.id in known:
            stats.duplicate += 1
            continue
        known.add(outcome.id)
        accepted.append(outcome)
        stats.estimate.add(outcome, card)
    stats.accepted += len(accepted)
    window = send_window_option(defaults.send_window)
    _consent_preview(stats, accepted, name, settings, window)
    return errors


def _count(done: Enqueued, stats: LaunchStats, settings: Settings) -> Errors:
    """Count an enqueued chunk's answers; answer each message's problems."""
    card = settings.rates
    for message in done.accepted:
        stats.estimate.add(message, card)
    errors: Errors = []
    for result in done.results:
        errors.append(list(result.errors) if result.status == "rejected" else None)
        if result.status == "accepted":
            stats.accepted += 1
            stats.expired_by_window += result.state == State.EXPIRED
        elif result.status == "duplicate":
            stats.duplicate += 1
        else:
            stats.suppressed += any("suppression list" in e.problem for e in result.errors)
    stats.waiting_for_window += done.waiting_for_window
    return errors


def _refusals(
    chunk: list[Row],
    readable: list[Row],
    messages_: list[dict[str, Any]],
    errors: Errors,
    stats: LaunchStats,
    settings: Settings,
) -> Iterator[Refusal]:
    """A chunk's refused rows, in line order: unreadable ones, then each problem of the rest."""
    stats.renumbered += sum(bool(phone_change(m, settings.default_phone_region)) for m in messages_)
    found = dict(zip((r.line for r in readable), zip(messages_, errors, strict=True), strict=True))
    for row in chunk:
        if row.problem is not None:
            stats.rejected += 1
            yield row.line, "row", row.problem, {}
            continue
        message, problems = found[row.line]
        if problems is not None:
            stats.rejected += 1
            for error in problems:
                yield row.line, error.field, error.problem, message


# --- retry what did not arrive ---------------------------------------------------------

# Final states a message may be sent again from: it never arrived. `delivered` never is.
RETRYABLE: tuple[State, ...] = (
    State.UNDELIVERABLE,
    State.PERMANENTERROR,
    State.REJECTED,
    State.FAILED,
    State.EXPIRED,
    State.TIMEOUT,
    State.CANCELLED,
)


def retry_states(text: str) -> tuple[State, ...]:
    """`--states undeliverable,failed,expired`, checked: final states that are not delivered."""
    chosen: list[State] = []
    for name in (n.strip().lower() for n in text.split(",")):
        if not name:
            continue
        if name == State.DELIVERED:
            raise CampaignError("--states: a delivered message is never sent again")
        if name not in {s.value for s in State}:
            raise CampaignError(
                f"--states: unknown state {name!r}; retryable: {', '.join(RETRYABLE)}"
            )
        if State(name) not in RETRYABLE:
            raise CampaignError(
                f"--states: {name!r} is not final; a message still under way is never resent"
            )
        chosen.append(State(name))
    if not chosen:
        raise CampaignError(f"--states: name at least one of {', '.join(RETRYABLE)}")
    return tuple(dict.fromkeys(chosen))


def retry_id(new_campaign: str, old_id: str) -> str:
    """The same old message retried under the same new name always gets the same new id,
    so a retry run twice enqueues nothing twice."""
    digest = hashlib.sha1(f"{new_campaign}\x00{old_id}".encode()).hexdigest()[:10]
    return f"{old_id[:230]}-r{digest}"


def retry_campaign(
    name: str,
    states: tuple[State, ...],
    settings: Settings,
    *,
    new_name: str | None = None,
    route: str | None = None,
    hold: bool = False,
) -> dict[str, Any] | None:
    """Send the messages of `name` that ended in `states` again, as a new campaign linked to
    it (`retry_of`), with new tracking ids; answer the counts, or None without `name`."""

    engine = get_engine(settings.database_url)
    new_name = new_name or f"{name}-retry"
    check_campaign(new_name)
    if new_name == name:
        raise CampaignError("--name: the retry needs a name of its own")
    with engine.connect() as conn:
        found = conn.execute(select(campaigns.c.name).where(campaigns.c.name == name)).first()
        linked = conn.execute(
            select(campaigns.c.retry_of).where(campaigns.c.name == new_name)
        ).first()
    if found is None:
        return None
    if linked is not None and linked.retry_of != name:
        raise CampaignError(
            f"--name: campaign {new_name!r} exists and is not a retry of {name!r}; "
            "give another --name"
        )
    ensure_campaign(engine, new_name)
    with engine.begin() as conn:
        conn.execute(update(campaigns).where(campaigns.c.name == new_name).values(retry_of=name))
    if hold:
        hold_campaign(engine, new_name)
    counts = {"selected": 0, "accepted": 0, "duplicate": 0, "rejected": 0}
    columns = [
        messages.c.pk,
        messages.c.id,
        messages.c.from_name,
        messages.c.to_phone,
        messages.c.message_type,
        messages.c.text,
        messages.c.ttl,
        messages.c.survey_options,
        messages.c.route,
        messages.c.callback_url,
        messages.c.callback_task,
    ]
    after = 0
    while True:
        with engine.connect() as conn:
            rows = conn.execute(
                select(*columns)
                .where(
                    messages.c.campaign == name,
                    messages.c.state.in_(states),
                    messages.c.pk > after,
                )
                .order_by(messages.c.pk)
                .limit(CHUNK)
            ).all()
        if not rows:
            break
        after = rows[-1].pk
        batch = []
        for row in rows:
            message: dict[str, Any] = {
                "id": retry_id(new_name, row.id),
                "fromName": row.from_name,
                "toPhone": row.to_phone,
                "messageType": row.message_type,
                "route": route or row.route,
            }
            for key, value in (
                ("text", row.text),
                ("ttl", row.ttl),
                ("surveyOptions", row.survey_options),
                ("callbackUrl", row.callback_url),
                ("callbackTask", row.callback_task),
            ):
                if value is not None:
                    message[key] = value
            batch.append(message)
        counts["selected"] += len(batch)
        for result in enqueue(batch, new_name, settings=settings):
            counts[result.status] += 1
    return {"campaign": new_name, "retry_of": name, "states": list(states), **counts}
