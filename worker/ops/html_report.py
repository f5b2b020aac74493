"""The campaign report as one self-contained HTML page, for operators to open or attach.

Everything is inline (CSS and SVG charts, no scripts, fonts or external files), so the
page renders offline and survives being mailed. Every value that came from data is
escaped: campaign names, states, channels and error codes are free text.
"""

from __future__ import annotations

import math
from datetime import datetime
from html import escape
from typing import Any

from worker.ops.reports import NO_CHANNEL, NOT_REPORTED, UNKNOWN_CURRENCY

# Final states first, in the same colours as the timeline; unlisted states fall back to grey.
STATE_COLOURS: dict[str, str] = {
    "delivered": "#2e7d32",
    "undeliverable": "#f9a825",
    "permanenterror": "#c62828",
    "rejected": "#6a1b9a",
    "failed": "#ef6c00",
    "expired": "#78909c",
    "cancelled": "#b0bec5",
    "timeout": "#6d4c41",
    "queued": "#bbdefb",
    "held": "#fff59d",
    "sending": "#90caf9",
    "submitted": "#64b5f6",
    "scheduled": "#42a5f5",
    "processing": "#1e88e5",
}
CHANNEL_COLOUR = "#3949ab"
OTHER_COLOUR = "#9e9e9e"
LATENCY_KEYS = ("p50", "p90", "p99", "max")

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0;
  color: #212121; background: #f5f5f5; }
main { max-width: 1100px; margin: 0 auto; padding: 24px; }
h1 { font-size: 26px; margin: 0 0 4px; word-break: break-all; }
h2 { font-size: 18px; margin: 0 0 12px; }
.sub { color: #616161; margin: 0 0 20px; }
section { background: #fff; border: 1px solid #e0e0e0; border-radius: 6px; padding: 16px 20px;
  margin: 0 0 16px; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin: 0 0 16px; }
.card { flex: 1 1 150px; background: #fff; border: 1px solid #e0e0e0; border-radius: 6px;
  padding: 12px 16px; }
.card .label { color: #616161; font-size: 13px; }
.card .value { font-size: 26px; font-weight: 600; margin-top: 4px; }
.card .note { color: #616161; font-size: 13px; margin-top: 2px; }
.row { display: flex; flex-wrap: wrap; gap: 16px; }
.row > section { flex: 1 1 420px; min-width: 0; }
table { border-collapse: collapse; width: 100%; font-size: 14px; }
th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid #eeeeee; }
th { color: #616161; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.swatch { display: inline-block; width: 10px; height: 10px; border-radius: 2px;
  margin-right: 6px; }
.empty { color: #757575; }
svg { display: block; width: 100%; height: auto; font-size: 12px; }
"""


def render_html(report: dict[str, Any], timeline: dict[str, Any]) -> str:
    """The whole page: headline figures, deliveries over time, states, channels, latency,
    top errors; `report` is campaign_report()'s dict, `timeline` deliveries_over_time()'s."""
    campaign = escape(str(report["campaign"]))
    body = "".join(
        [
            f"<h1>Campaign {campaign}</h1>",
            f'<p class="sub">{_period(report)}</p>',
            _headline(report),
            _section("Deliveries over time", _timeline_chart(timeline)),
            '<div class="row">',
            _section("States", _bar_chart(_state_bars(report["states"])) + _state_table(report)),
            _section("Delivering channel", _channels(report["channels"])),
            '</div><div class="row">',
            _section("Latency (seconds)", _latency(report["latency_seconds"])),
            _section("Top errors", _errors(report["top_errors"])),
            "</div>",
        ]
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>Campaign {campaign}: delivery report</title>"
        f"<style>{_STYLE}</style></head><body><main>{body}</main></body></html>\n"
    )


def _section(title: str, content: str) -> str:
    return f"<section><h2>{escape(title)}</h2>{content}</section>"


def _period(report: dict[str, Any]) -> str:
    first = _clock(report.get("first_enqueued_at"), with_date=True)
    last = _clock(report.get("last_final_at"), with_date=True)
    done = "all messages final" if report["all_final"] else "still in progress"
    return escape(f"First enqueued {first}, last final {last} (UTC); {done}.")


def _headline(report: dict[str, Any]) -> str:
    money = report["money"]
    cards = [
        _card("Messages", f"{report['total']:,}", f"{report['final']:,} final", "total"),
        _card("Delivered", f"{report['delivered']:,}", f"of {report['sent']:,} sent", "delivered"),
        _card("Delivery rate", _percent(report["delivery_rate"]), "of all messages"),
        _card("Delivery rate of sent", _percent(report["delivery_rate_of_sent"]), "of sent"),
    ]
    cards += [
        _card(
            "Cost, currency not reported" if currency == UNKNOWN_CURRENCY else f"Cost {currency}",
            f"{figures['cost']:,.2f}",
            f"billed {figures['bill']:,.2f} for {figures['messages']:,} messages"
            + (f"; {figures['note']}" if figures.get("note") else ""),
        )
        for currency, figures in money.items()
    ] or [_card("Cost", f"{report['cost'] or 0:,.2f}", "no amounts reported yet")]
    return f'<div class="cards">{"".join(cards)}</div>'


def _card(label: str, value: str, note: str, figure: str | None = None) -> str:
    """`figure` names the card for machines (data-figure), as the live page's test reads it."""
    named = f' data-figure="{escape(figure)}"' if figure else ""
    return (
        f'<div class="card"{named}><div class="label">{escape(label)}</div>'
        f'<div class="value">{escape(value)}</div><div class="note">{escape(note)}</div></div>'
    )


def _percent(rate: float) -> str:
    return f"{rate:.1%}"


def _clock(iso: str | None, *, with_date: bool = False) -> str:
    if not iso:
        return "n/a"
    moment = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    return moment.strftime("%Y-%m-%d %H:%M:%S" if with_date else "%H:%M:%S")


def _colour(state: str) -> str:
    return STATE_COLOURS.get(state, OTHER_COLOUR)


def _tick_step(peak: int) -> int:
    """The smallest 1, 2 or 5 × 10^k giving at most four steps up to `peak`: round ticks."""
    rough = max(peak / 4, 1)
    power = 10 ** math.floor(math.log10(rough))
    return next(int(step * power) for step in (1, 2, 5, 10) if step * power >= rough)


def _timeline_chart(timeline: dict[str, Any]) -> str:
    """Stacked bars, one per bucket and one colour per final state, with axes and legend."""
    buckets = timeline["buckets"]
    if not buckets:
        return '<p class="empty">No message has reached a final state yet.</p>'
    states: list[str] = timeline["states"]
    width, height, left, right, top, bottom = 1040, 300, 70, 12, 12, 44
    plot_w, plot_h = width - left - right, height - top - bottom
    tallest = max(sum(bucket["counts"].values()) for bucket in buckets)
    step = _tick_step(tallest)
    peak = step * max(1, math.ceil(tallest / step))
    slot = plot_w / len(buckets)
    parts = [_y_axis(peak, step, left, top, plot_w, plot_h)]
    for i, bucket in enumerate(buckets):
        parts.append(_stack(bucket, states, left + i * slot, slot, top + plot_h, plot_h / peak))
    parts.append(_x_axis(buckets, left, top + plot_h, slot))
    parts.append(
        f'<text x="{left + plot_w / 2:.0f}" y="{height - 4}" text-anchor="middle" '
        f'fill="#616161">time (UTC), {timeline["bucket_seconds"]} s per bar</text>'
        f'<text transform="translate(14 {top + plot_h / 2:.0f}) rotate(-90)" '
        'text-anchor="middle" fill="#616161">messages reaching a final state</text>'
    )
    svg = (
        f'<svg viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="final states per time bucket">{"".join(parts)}</svg>'
    )
    return svg + _legend(states)


def _y_axis(peak: int, step: int, left: float, top: float, plot_w: float, plot_h: float) -> str:
    ticks = []
    for value in range(0, peak + 1, step):
        y = top + plot_h - plot_h * value / peak
        ticks.append(
            f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" '
            f'stroke="{"#9e9e9e" if value == 0 else "#eeeeee"}"/>'
            f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" fill="#616161">'
            f"{value:,}</text>"
        )
    return "".join(ticks)


def _stack(
    bucket: dict[str, Any], states: list[str], x: float, slot: float, base: float, scale: float
) -> str:
    bar_w = max(slot * 0.8, 1.0)
    y = base
    rects = []
    for state in states:
        count = bucket["counts"].get(state, 0)
        if not count:
            continue
        h = count * scale
        y -= h
        tip = f"{_clock(bucket['start'])} {state}: {count:,}"
        rects.append(
            f'<rect x="{x + (slot - bar_w) / 2:.1f}" y="{y:.1f}" width="{bar_w:.1f}" '
            f'height="{h:.1f}" fill="{_colour(state)}"><title>{escape(tip)}</title></rect>'
        )
    return "".join(rects)


def _x_axis(buckets: list[dict[str, Any]], left: float, base: float, slot: float) -> str:
    """About six time labels, at bucket starts, whatever the number of buckets."""
    every = max(1, math.ceil(len(buckets) / 6))
    labels = []
    for i in range(0, len(buckets), every):
        x = left + i * slot
        labels.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{base}" y2="{base + 4}" stroke="#9e9e9e"/>'
            f'<text x="{x:.1f}" y="{base + 18}" text-anchor="middle" fill="#616161">'
            f"{escape(_clock(buckets[i]['start']))}</text>"
        )
    return "".join(labels)


def _legend(states: list[str]) -> str:
    items = "".join(
        f'<span style="margin-right:16px"><span class="swatch" '
        f'style="background:{_colour(state)}"></span>{escape(state)}</span>'
        for state in states
    )
    return f'<p style="font-size:14px">{items}</p>'


def _state_bars(states: dict[str, int]) -> list[tuple[str, int, str]]:
    return [(state, count, _colour(state)) for state, count in _sorted_counts(states)]


def _bar_chart(bars: list[tuple[str, int, str]]) -> str:
    """Horizontal bars with the label on the left and count and share on the right, sized
    for a half-width section."""
    if not bars:
        return '<p class="empty">Nothing to show yet.</p>'
    total = sum(count for _, count, _ in bars) or 1
    longest = max(count for _, count, _ in bars) or 1
    width, label_w, figure_w, row_h = 500, 110, 120, 24
    plot_w = width - label_w - figure_w
    rows = []
    for i, (label, count, colour) in enumerate(bars):
        y = i * row_h
        bar = max(count / longest * plot_w, 1.0 if count else 0.0)
        rows.append(
            f'<text x="{label_w - 8}" y="{y + 17}" text-anchor="end">{escape(label)}</text>'
            f'<rect x="{label_w}" y="{y + 4}" width="{bar:.1f}" height="{row_h - 8}" '
            f'fill="{colour}" rx="2"/>'
            f'<text x="{label_w + bar + 8:.1f}" y="{y + 17}" fill="#424242">'
            f"{count:,} ({count / total:.1%})</text>"
        )
    height = len(bars) * row_h
    return (
        f'<svg viewBox="0 0 {width} {height}" role="img" aria-label="bar chart">'
        f"{''.join(rows)}</svg>"
    )


def _state_table(report: dict[str, Any]) -> str:
    total = report["total"] or 1
    rows = "".join(
        f'<tr data-state="{escape(state)}" data-count="{count}">'
        f'<td><span class="swatch" style="background:{_colour(state)}"></span>'
        f'{escape(state)}</td><td class="num">{count:,}</td>'
        f'<td class="num">{count / total:.1%}</td></tr>'
        for state, count in _sorted_counts(report["states"])
    )
    return (
        '<table><tr><th>state</th><th class="num">messages</th><th class="num">share</th></tr>'
        f"{rows}</table>"
    )


def _sorted_counts(counts: dict[str, int]) -> list[tuple[str, int]]:
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))


def _channels(channels: dict[str, int]) -> str:
    if not channels:
        return '<p class="empty">No delivery reported by any channel yet.</p>'
    total = sum(channels.values())
    rows = "".join(
        f'<tr><td>{escape(channel)}</td><td class="num">{count:,}</td>'
        f'<td class="num">{count / total:.1%}</td></tr>'
        for channel, count in channels.items()
    )
    bars = _bar_chart(
        [(channel, count, _channel_colour(channel)) for channel, count in channels.items()]
    )
    return (
        f'{bars}<table><tr><th>channel</th><th class="num">messages</th>'
        f'<th class="num">share</th></tr>{rows}</table>'
    )


def _channel_colour(channel: str) -> str:
    return OTHER_COLOUR if channel in (NO_CHANNEL, NOT_REPORTED) else CHANNEL_COLOUR


def _latency(latency: dict[str, dict[str, float | None]]) -> str:
    names = {"submit_to_final": "submit → final", "enqueue_to_final": "enqueue → final"}
    head = "".join(f'<th class="num">{key}</th>' for key in LATENCY_KEYS)
    rows = "".join(
        f"<tr><td>{escape(names.get(span, span))}</td>"
        + "".join(f'<td class="num">{_seconds(figures.get(key))}</td>' for key in LATENCY_KEYS)
        + "</tr>"
        for span, figures in latency.items()
    )
    return f"<table><tr><th>span</th>{head}</tr>{rows}</table>"


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else escape(f"{value:,.1f}")


def _errors(errors: list[dict[str, Any]]) -> str:
    if not errors:
        return '<p class="empty">No failed messages.</p>'
    rows = "".join(
        f'<tr data-count="{error["count"]}"><td>{escape(str(error["code"]))}</td>'
        f'<td class="num">{error["count"]:,}</td></tr>'
        for error in errors
    )
    return f'<table><tr><th>error code</th><th class="num">messages</th></tr>{rows}</table>'
