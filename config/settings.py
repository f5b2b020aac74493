"""Every setting of the worker, read from the environment or `.env`.

Names are part of the public contract (README, `.env.example`): keep them stable.
A bad value stops start-up with pydantic's message, which names the setting.
"""

from __future__ import annotations

import ipaddress
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MAX_SECONDS = 366 * 24 * 3600.0
_TOKEN = re.compile(r"[A-Za-z0-9._~+/=-]+")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]{0,19}")


def _scheme(url: str) -> str:
    """Name a URL's scheme for an error; anything else of the value may be a password."""
    scheme, sep, _ = url.partition("://")
    if sep and _SCHEME.fullmatch(scheme):
        return f"scheme {scheme!r}"
    return "a value without a scheme://"


class Settings(BaseSettings):
    # hide_input_in_errors: an error must name the setting, never echo the values it was
    # given (a model-level error would otherwise print every key and password in the input).
    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        env_ignore_empty=True,  # `SECRET=` in .env means unset, not an empty secret
        extra="ignore",
        case_sensitive=False,
        hide_input_in_errors=True,
        # "inf" and "nan" parse as floats and pass gt=0; every duration would then overflow
        # (timedelta, Celery time limits) only when first used, inside a running worker.
        allow_inf_nan=False,
    )

    # --- connections -------------------------------------------------------------------
    database_url: str = Field("sqlite:///cascade.db", alias="DATABASE_URL", repr=False)
    broker_url: str = Field("redis://localhost:6379/0", alias="BROKER_URL", repr=False)

    # --- provider ------------------------------------------------------------------------
    smsbat_base_url: str = Field("https://restapi.smsbat.com", alias="SMSBAT_BASE_URL")
    smsbat_status_base_url: str | None = Field(None, alias="SMSBAT_STATUS_BASE_URL")
    smsbat_api_key: SecretStr | None = Field(None, alias="SMSBAT_API_KEY")
    smsbat_username: str | None = Field(None, alias="SMSBAT_USERNAME")
    smsbat_password: SecretStr | None = Field(None, alias="SMSBAT_PASSWORD")
    smsbat_viber_token: SecretStr | None = Field(None, alias="SMSBAT_VIBER_TOKEN")
    smsbat_tg_bot_key: SecretStr | None = Field(None, alias="SMSBAT_TG_BOT_KEY")
    smsbat_status_auth: Literal["key", "basic", "basic_key"] = Field(
        "key", alias="SMSBAT_STATUS_AUTH"
    )
    webhook_token: SecretStr | None = Field(None, alias="WEBHOOK_TOKEN")

    # --- HTTP ------------------------------------------------------------------------------
    http_connect_timeout_seconds: float = Field(5.0, gt=0, alias="HTTP_CONNECT_TIMEOUT_SECONDS")
    http_read_timeout_seconds: float = Field(30.0, gt=0, alias="HTTP_READ_TIMEOUT_SECONDS")
    http_write_timeout_seconds: float = Field(10.0, gt=0, alias="HTTP_WRITE_TIMEOUT_SECONDS")
    http_pool_size: int = Field(20, ge=1, alias="HTTP_POOL_SIZE")

    # --- send policy -----------------------------------------------------------------------
    send_batch_max: int = Field(1000, ge=1, le=1000, alias="SEND_BATCH_MAX")
    send_batch_min: int = Field(100, ge=1, le=1000, alias="SEND_BATCH_MIN")
    send_linger_seconds: float = Field(1.0, ge=0, alias="SEND_LINGER_SECONDS")
    send_parallelism: int = Field(4, ge=1, le=256, alias="SEND_PARALLELISM")
    send_lease_seconds: float = Field(300.0, gt=0, alias="SEND_LEASE_SECONDS")
    # A message's retries are bounded by time, not by a count a short outage would spend.
    send_retry_for_seconds: float = Field(21600.0, gt=0, alias="SEND_RETRY_FOR_SECONDS")
    # A send whose answer was lost is resent blind at most this many times.
    send_max_unknown_outcomes: int = Field(3, ge=1, alias="SEND_MAX_UNKNOWN_OUTCOMES")
    # Consecutive provider failures (5xx, connection errors, timeouts) that open the circuit.
    send_circuit_failures: int = Field(3, ge=1, alias="SEND_CIRCUIT_FAILURES")
    send_probe_size: int = Field(10, ge=1, le=1000, alias="SEND_PROBE_SIZE")
    send_backoff_base_seconds: float = Field(1.0, gt=0, alias="SEND_BACKOFF_BASE_SECONDS")
    send_backoff_max_seconds: float = Field(300.0, gt=0, alias="SEND_BACKOFF_MAX_SECONDS")
    send_unknown_outcome: Literal["resend", "fail"] = Field("resend", alias="SEND_UNKNOWN_OUTCOME")
    send_requests_per_second: int = Field(0, ge=0, alias="SEND_REQUESTS_PER_SECOND")
    send_messages_per_second: int = Field(0, ge=0, alias="SEND_MESSAGES_PER_SECOND")
    circuit_open_seconds: float = Field(30.0, gt=0, alias="CIRCUIT_OPEN_SECONDS")
    retry_after_default_seconds: float = Field(5.0, gt=0, alias="RETRY_AFTER_DEFAULT_SECONDS")
    retry_after_max_seconds: float = Field(600.0, gt=0, alias="RETRY_AFTER_MAX_SECONDS")
    dispatch_interval_seconds: float = Field(1.0, gt=0, alias="DISPATCH_INTERVAL_SECONDS")

    # --- validation at the door ------------------------------------------------------------
    schedule_past_skew_seconds: float = Field(60.0, ge=0, alias="SCHEDULE_PAST_SKEW_SECONDS")
    schedule_max_ahead_days: float = Field(30.0, gt=0, le=30, alias="SCHEDULE_MAX_AHEAD_DAYS")
    # National and '+'-less numbers are read as this country's: "UA" turns 067 123 4567 and
    # 380671234567 into +380671234567. Unset: only E.164 is accepted.
    default_phone_region: str | None = Field(None, alias="DEFAULT_PHONE_REGION")
    # A message scheduled further ahead than this stays in our queue (cancel and pause work
    # on it) until SCHEDULE_SEND_LEAD_SECONDS before its time; scheduledSent still goes to
    # the provider. 0: every scheduled message goes to the provider at once.
    # Prices for estimates (`campaign launch --dry-run`): "380:sms=0.95,viber=0.45;*:sms=1.5"
    # (see config/rates.py), in RATE_CARD_CURRENCY.
    rate_card: str | None = Field(None, alias="RATE_CARD")
    rate_card_currency: str | None = Field(
        None, min_length=1, max_length=8, pattern=r"^[A-Za-z]+$", alias="RATE_CARD_CURRENCY"
    )
    # Global caps over every campaign and message, per UTC day (worker/flows/quota.py): reaching
    # one pauses sending until 00:00 UTC (messages stay queued, never dropped). The budget
    # counts each message at its RATE_CARD price, in RATE_CARD_CURRENCY. Unset: no cap.
    daily_message_cap: int | None = Field(None, ge=1, alias="DAILY_MESSAGE_CAP")
    daily_spend_budget: float | None = Field(None, gt=0, alias="DAILY_SPEND_BUDGET")
    schedule_hold_ahead_seconds: float = Field(600.0, ge=0, alias="SCHEDULE_HOLD_AHEAD_SECONDS")
    schedule_send_lead_seconds: float = Field(120.0, ge=0, alias="SCHEDULE_SEND_LEAD_SECONDS")

    # --- consent and quiet hours (worker/flows/consent.py, worker/core/quiet.py) ------------------
    # Comma-separated; a reply that, folded (case, accents, spaces, punctuation), IS one of
    # them opts its sender out / back in. Unset: English, Ukrainian, Russian, Polish, Czech,
    # Slovak, Romanian and German defaults.
    optout_keywords: str | None = Field(None, alias="OPTOUT_KEYWORDS")
    optin_keywords: str | None = Field(None, alias="OPTIN_KEYWORDS")
    # Message types the suppression list applies to (transactional and flash-call go).
    suppress_message_types: str = Field("promo,viber_survey", alias="SUPPRESS_MESSAGE_TYPES")
    # Promo and surveys go only inside this window of the recipient's local time; unset or
    # "off": any time. Per type: "viber_survey=10:00-18:00;transaction=off".
    send_window: str | None = Field(None, alias="SEND_WINDOW")
    send_window_by_type: str | None = Field(None, alias="SEND_WINDOW_BY_TYPE")
    # The zone of a number whose prefix names none.
    send_window_fallback_timezone: str = Field("UTC", alias="SEND_WINDOW_FALLBACK_TIMEZONE")

    # --- poll policy -----------------------------------------------------------------------
    poll_first_delay_seconds: float = Field(5.0, gt=0, alias="POLL_FIRST_DELAY_SECONDS")
    poll_backoff_factor: float = Field(2.0, ge=1, alias="POLL_BACKOFF_FACTOR")
    poll_jitter: float = Field(0.2, ge=0, lt=1, alias="POLL_JITTER")
    poll_max_interval_seconds: float = Field(300.0, gt=0, alias="POLL_MAX_INTERVAL_SECONDS")
    poll_min_gap_seconds: float = Field(1.0, ge=1, alias="POLL_MIN_GAP_SECONDS")
    poll_grace_seconds: float = Field(3600.0, ge=0, alias="POLL_GRACE_SECONDS")
    poll_max_age_seconds: float = Field(259200.0, gt=0, le=259200, alias="POLL_MAX_AGE_SECONDS")
    poll_batch_size: int = Field(200, ge=1, le=5000, alias="POLL_BATCH_SIZE")
    # Checks under way at once per process, from one thread (worker/provider/keepalive.py):
    # more costs no CPU; with a provider 50 ms away a process checks about 6 a second per
    # connection.
    poll_concurrency: int = Field(32, ge=1, le=1000, alias="POLL_CONCURRENCY")
    poll_lease_seconds: float = Field(120.0, gt=0, alias="POLL_LEASE_SECONDS")
    poll_sweep_interval_seconds: float = Field(2.0, gt=0, alias="POLL_SWEEP_INTERVAL_SECONDS")
    poll_max_queued_tasks: int = Field(20, ge=1, alias="POLL_MAX_QUEUED_TASKS")
    # Sends come first: while a full batch waits to be sent, polling gets this many tasks.
    poll_tasks_while_sending: int = Field(2, ge=1, alias="POLL_TASKS_WHILE_SENDING")
    status_requests_per_second: int = Field(0, ge=0, alias="STATUS_REQUESTS_PER_SECOND")
    # Past its deadline a message times out only on an answer; with the status endpoint down
    # it is checked on for this long before it times out unanswered.
    poll_outage_grace_seconds: float = Field(21600.0, ge=0, alias="POLL_OUTAGE_GRACE_SECONDS")
    # Checks timed from the route's recent latencies (README: Status checks): one message in
    # POLL_LEARN_EVERY is checked every POLL_LEARN_STEP_SECONDS to learn them (0: the fixed
    # schedule only); the others at these quantiles of what those showed.
    poll_learn_every: int = Field(100, ge=0, alias="POLL_LEARN_EVERY")
    poll_learn_step_seconds: float = Field(5.0, ge=1, alias="POLL_LEARN_STEP_SECONDS")
    poll_learn_until_seconds: float = Field(180.0, gt=0, alias="POLL_LEARN_UNTIL_SECONDS")
    poll_learn_quantiles: Annotated[tuple[float, ...], NoDecode] = Field(
        (0.8, 0.99), alias="POLL_LEARN_QUANTILES"
    )
    poll_learn_min_samples: int = Field(50, ge=1, alias="POLL_LEARN_MIN_SAMPLES")

    # --- HTTP API and pushed reports --------------------------------------------------------
    api_token: SecretStr | None = Field(None, alias="API_TOKEN")
    api_host: str = Field("127.0.0.1", alias="API_HOST")
    api_port: int = Field(8000, ge=1, le=65535, alias="API_PORT")
    webhook_signing_secret: SecretStr | None = Field(None, alias="WEBHOOK_SIGNING_SECRET")
    webhook_signature_tolerance_seconds: float = Field(
        300.0, gt=0, alias="WEBHOOK_SIGNATURE_TOLERANCE_SECONDS"
    )
    webhook_max_body_bytes: int = Field(1_000_000, ge=1024, alias="WEBHOOK_MAX_BODY_BYTES")
    webhooks_enabled: bool = Field(False, alias="WEBHOOKS_ENABLED")
    poll_first_delay_with_webhooks_seconds: float = Field(
        600.0, gt=0, alias="POLL_FIRST_DELAY_WITH_WEBHOOKS_SECONDS"
    )
    # The unit of a BulkGate DLR's `price` (it names none): "EUR", "CREDITS"… Unset, those
    # amounts are reported apart as currency "unknown", never added to others.
    bulkgate_price_currency: str | None = Field(
        None, min_length=1, max_length=8, pattern=r"^[A-Za-z]+$", alias="BULKGATE_PRICE_CURRENCY"
    )
    report_park_max_seconds: float = Field(259200.0, gt=0, alias="REPORT_PARK_MAX_SECONDS")
    reports_interval_seconds: float = Field(2.0, gt=0, alias="REPORTS_INTERVAL_SECONDS")

    # --- outcome callbacks to producers ------------------------------------------------------
    callback_signing_secret: SecretStr | None = Field(None, alias="CALLBACK_SIGNING_SECRET")
    callback_timeout_seconds: float = Field(10.0, gt=0, alias="CALLBACK_TIMEOUT_SECONDS")
    callback_retry_for_seconds: float = Field(90000.0, ge=86400, alias="CALLBACK_RETRY_FOR_SECONDS")
    callback_backoff_base_seconds: float = Field(5.0, gt=0, alias="CALLBACK_BACKOFF_BASE_SECONDS")
    callback_backoff_max_seconds: float = Field(3600.0, gt=0, alias="CALLBACK_BACKOFF_MAX_SECONDS")
    callback_batch_size: int = Field(100, ge=1, le=1000, alias="CALLBACK_BATCH_SIZE")
    callback_concurrency: int = Field(20, ge=1, le=500, alias="CALLBACK_CONCURRENCY")
    callbacks_interval_seconds: float = Field(2.0, gt=0, alias="CALLBACKS_INTERVAL_SECONDS")

    # --- sweeper ---------------------------------------------------------------------------
    sweep_interval_seconds: float = Field(15.0, gt=0, alias="SWEEP_INTERVAL_SECONDS")

    # --- monitoring (Flower) -----------------------------------------------------------------
    # `worker/celery.py` hands these to `celery -A worker flower` as its FLOWER_* options.
    flower_basic_auth: SecretStr | None = Field(None, alias="FLOWER_BASIC_AUTH")
    flower_max_tasks: int = Field(10_000, ge=1, alias="FLOWER_MAX_TASKS")
    # Flower's own default ('') binds every interface while its banner says 127.0.0.1.
    flower_address: str = Field("127.0.0.1", alias="FLOWER_ADDRESS")

    # --- metrics, health and logs (Prometheus, /healthz) ---------------------------------------
    # Bearer token for /metrics; API_TOKEN when unset.
    metrics_token: SecretStr | None = Field(None, alias="METRICS_TOKEN")
    # Opens the live campaign pages (GET /campaigns/NAME) and nothing else; API_TOKEN does too.
    readonly_token: SecretStr | None = Field(None, alias="READONLY_TOKEN")
    campaign_page_refresh_seconds: float = Field(
        5.0, ge=1, le=3600, alias="CAMPAIGN_PAGE_REFRESH_SECONDS"
    )
    # Every message by state and campaign (tallies, and the messages without a campaign).
    metrics_totals_seconds: float = Field(60.0, ge=0, alias="METRICS_TOTALS_SECONDS")
    metrics_top_campaigns: int = Field(20, ge=1, le=500, alias="METRICS_TOP_CAMPAIGNS")
    health_beat_max_age_seconds: float = Field(120.0, gt=0, alias="HEALTH_BEAT_MAX_AGE_SECONDS")
    health_queue_max_age_seconds: float = Field(1800.0, gt=0, alias="HEALTH_QUEUE_MAX_AGE_SECONDS")
    log_format: Literal["text", "json"] = Field("text", alias="LOG_FORMAT")

    @field_validator("*")
    @classmethod
    def _bounded_duration(cls, value: object, info: ValidationInfo) -> object:
        """Every `*_seconds` setting at most a year: more overflows date arithmetic later."""
        name = info.field_name or ""
        if name.endswith("_seconds") and isinstance(value, float) and value > MAX_SECONDS:
            raise ValueError(f"must be at most {MAX_SECONDS:.0f} seconds (366 days)")
        return value

    @field_validator("default_phone_region")
    @classmethod
    def _phone_region(cls, value: str | None) -> str | None:
        import phonenumbers

        if value is None:
            return None
        if value.upper() not in phonenumbers.SUPPORTED_REGIONS:
            raise ValueError("must be a two-letter country code such as UA or PL")
        return value.upper()

    @field_validator("rate_card")
    @classmethod
    def _rate_card(cls, value: str | None) -> str | None:
        from config.rates import parse_rate_card

        if value is not None:
            parse_rate_card(value, echo=False)  # names the entry by position, never its text
        return value

    @field_validator("poll_learn_quantiles", mode="before")
    @classmethod
    def _quantile_list(cls, value: object) -> object:
        """`0.8,0.99`, `[0.8,0.99]` or a lone `0.9`."""
        if isinstance(value, int | float):
            return (value,)
        if isinstance(value, str):
            return tuple(part.strip() for part in value.strip("[] ").split(",") if part.strip())
        return value

    @field_validator("poll_learn_quantiles")
    @classmethod
    def _quantiles(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not value or any(not 0 < q <= 1 for q in value):
            raise ValueError("must be one or more quantiles above 0 and at most 1, e.g. [0.8,0.99]")
        return tuple(sorted(value))

    @model_validator(mode="after")
    def _consent(self) -> Settings:
        """Keyword lists, types and windows checked at start-up; each error names its setting."""
        from zoneinfo import ZoneInfo

        from worker.core.keywords import keywords_from, parse_types
        from worker.core.quiet import windows_from

        keywords_from(self.optout_keywords, self.optin_keywords)
        parse_types(self.suppress_message_types)
        windows_from(self.send_window, self.send_window_by_type)
        try:
            ZoneInfo(self.send_window_fallback_timezone)
        except (ValueError, LookupError):
            raise ValueError(
                "SEND_WINDOW_FALLBACK_TIMEZONE: not a time zone name like UTC or Europe/Kyiv"
            ) from None
        return self

    @property
    def keywords(self) -> Any:
        from worker.core.keywords import keywords_from

        return keywords_from(self.optout_keywords, self.optin_keywords)

    @property
    def suppressed_types(self) -> frozenset[str]:
        from worker.core.keywords import parse_types

        return parse_types(self.suppress_message_types)

    @property
    def windows(self) -> Any:
        from worker.core.quiet import windows_from

        return windows_from(self.send_window, self.send_window_by_type)

    @property
    def rates(self) -> dict[str, dict[str, float]] | None:
        from config.rates import parse_rate_card

        return parse_rate_card(self.rate_card) if self.rate_card else None

    @field_validator("database_url")
    @classmethod
    def _database_driver(cls, value: str) -> str:
        """Plain `postgresql://` URLs get the psycopg 3 driver we ship."""
        if value.startswith("postgres://"):
            value = "postgresql://" + value.removeprefix("postgres://")
        if value.startswith("postgresql://"):
            value = "postgresql+psycopg://" + value.removeprefix("postgresql://")
        if not value.startswith(("sqlite:", "postgresql+psycopg:")):
            raise ValueError(f"must be a sqlite:// or postgresql:// URL, got {_scheme(value)}")
        if value.startswith("postgresql"):
            try:
                import psycopg  # noqa: F401
            except ImportError:
                raise ValueError(
                    "a postgresql:// URL needs psycopg: pip install 'cascade-worker[postgres]'"
                ) from None
        return value

    @field_validator("broker_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        """Redis is the only broker the pacing and pauses work with; fail here, not in Celery."""
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"must be a redis://, rediss:// or unix:// URL, got {_scheme(value)}")
        return value

    @field_validator("smsbat_base_url", "smsbat_status_base_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"must start with http:// or https://, got {_scheme(value)}")
        return value.rstrip("/") if value else value

    @field_validator("api_token", "webhook_token", "metrics_token", "readonly_token")
    @classmethod
    def _header_safe_token(cls, value: SecretStr | None) -> SecretStr | None:
        """Bearer tokens travel in headers (Latin-1) and URLs: anything but RFC 6750's
        token characters could never be presented as configured, so every caller would get
        401. Refused here, without echoing it."""
        token = value.get_secret_value() if value is not None else ""
        if token and not _TOKEN.fullmatch(token):  # empty means unset, as in `.env`
            raise ValueError("must be letters, digits and - . _ ~ + / = only (no spaces)")
        return value

    @field_validator("flower_basic_auth")
    @classmethod
    def _basic_auth_pairs(cls, value: SecretStr | None) -> SecretStr | None:
        """Flower silently never matches a malformed pair: refuse it here, without echoing it."""
        if value is None or not value.get_secret_value():
            return None
        for number, pair in enumerate(value.get_secret_value().split(","), 1):
            user, colon, password = pair.partition(":")
            if not (user and colon and password):
                raise ValueError(f"pair {number} must be user:password (several comma-separated)")
        return value

    @field_validator("flower_address")
    @classmethod
    def _ip_address(cls, value: str) -> str:
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            raise ValueError(
                "must be an IP address to bind: 127.0.0.1, or 0.0.0.0 for all"
            ) from None

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.send_batch_min > self.send_batch_max:
            raise ValueError("SEND_BATCH_MIN must not exceed SEND_BATCH_MAX")
        if self.rate_card and not self.rate_card_currency:
            raise ValueError("RATE_CARD needs RATE_CARD_CURRENCY (the currency of its prices)")
        if self.daily_spend_budget is not None and not self.rate_card:
            raise ValueError(
                "DAILY_SPEND_BUDGET needs RATE_CARD (and RATE_CARD_CURRENCY): the budget "
                "counts each message at its price there"
            )
        if self.schedule_send_lead_seconds > self.schedule_hold_ahead_seconds > 0:
            raise ValueError(
                "SCHEDULE_SEND_LEAD_SECONDS must not exceed SCHEDULE_HOLD_AHEAD_SECONDS"
            )
        if self.smsbat_status_auth == "basic" and not (
            self.smsbat_username and self.smsbat_password
        ):
            raise ValueError("SMSBAT_STATUS_AUTH=basic needs SMSBAT_USERNAME and SMSBAT_PASSWORD")
        return self

    @property
    def status_base_url(self) -> str:
        return self.smsbat_status_base_url or self.smsbat_base_url


ENV_FILE_VARIABLE = "CASCADE_ENV_FILE"


class EnvFileMissing(ValueError):
    """CASCADE_ENV_FILE names a file that is not there: silently reading none would run
    on defaults (a new SQLite file in the working directory)."""


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once: workers fork after this. The env file is
    CASCADE_ENV_FILE when set, else `.env` in the working directory if there is one."""
    named = os.environ.get(ENV_FILE_VARIABLE)
    if named and not Path(named).is_file():
        raise EnvFileMissing(f"{ENV_FILE_VARIABLE}={named}: no such file")
    return Settings(_env_file=named or ".env")
