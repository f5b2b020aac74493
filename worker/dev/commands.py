"""`cascade simulator` and `cascade demo`: development commands, loaded by name by the
`cascade` group (worker/ops/cli.py) only when run."""

from __future__ import annotations

from typing import Any

import click

from worker.ops.cli import print_report
from worker.ops.common import console, load_settings


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8090, show_default=True, type=int)
@click.option("--api-key", default="test-key", show_default=True)
@click.option("--username", default="user", show_default=True)
@click.option("--password", default="pass", show_default=True)
@click.option("--delay-min", default=5.0, show_default=True, help="Seconds to a final state.")
@click.option("--delay-max", default=30.0, show_default=True)
@click.option("--delivered", default=0.9, show_default=True, help="Share delivered.")
@click.option("--undeliverable", default=0.07, show_default=True)
@click.option("--permanenterror", default=0.03, show_default=True)
@click.option("--latency-ms", default=0.0, show_default=True)
@click.option("--error-rate", default=0.0, show_default=True, help="Share of 500 answers.")
@click.option("--throttle-next", default=0, show_default=True, help="Answer 429 to N sends.")
@click.option("--retry-after", default="1", show_default=True)
@click.option("--webhook-url", default=None, help="POST SMSBAT status webhooks here.")
@click.option(
    "--webhook-token",
    default=None,
    envvar="SIMULATOR_WEBHOOK_TOKEN",
    help="Send pushes with 'Authorization: Bearer TOKEN'.",
)
@click.option(
    "--webhook-secret",
    default=None,
    envvar="SIMULATOR_WEBHOOK_SECRET",
    help="Sign pushes (X-Cascade-Timestamp, X-Cascade-Signature).",
)
@click.option("--dlr-url", default=None, help="Send BulkGate delivery reports here.")
@click.option(
    "--dlr-form",
    default="json",
    show_default=True,
    type=click.Choice(["json", "query"]),
    help="POSTed JSON arrays, or one GET with query parameters per report.",
)
@click.option(
    "--inbound-rate",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Share of delivered messages answered by an inbound SMS (status 10).",
)
@click.option(
    "--push-duplicates",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Share of pushes sent twice.",
)
@click.option("--push-reorder", is_flag=True, help="Let finals overtake intermediate pushes.")
@click.option("--push-early", is_flag=True, help="Push before answering the send request.")
@click.option(
    "--push-drop",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Share of pushes silently lost.",
)
@click.option("--seed", default=None, type=int)
def simulator(**options: Any) -> None:
    """Serve the SMSBAT cascade and status endpoints on loopback for demos and tests."""
    from worker.dev.simulator import SimulatorConfig, push_targets, serve

    host, port = options.pop("host"), options.pop("port")
    mix = {k: options.pop(k) for k in ("delivered", "undeliverable", "permanenterror")}
    try:
        config = SimulatorConfig(mix=mix, **options)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    console.print(f"simulator on http://{host}:{port} (api key {'*' * 4})")
    for line in push_targets(config):
        console.print(line)
    serve(host, port, config)


@click.command()
@click.option("--messages", "count", default=2000, show_default=True, type=int)
@click.option("--campaign", "name", default=None, help="Campaign name (default: demo-<time>).")
def demo(count: int, name: str | None) -> None:
    """Run a campaign end to end: simulator, worker and beat, enqueue, track to all-final."""
    from worker.dev.demo import run_demo

    report = run_demo(load_settings(), count, name, console)
    print_report(report)
    if not report["all_final"]:
        raise click.ClickException("demo ended before every message was final")
