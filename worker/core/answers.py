"""The provider's answers that are not a result: what the client raises, and what the send
and check policies decide on (re-exported by worker/provider/smsbat.py, which raises them)."""

from __future__ import annotations


class ProviderError(Exception):
    pass


class BadRequest(ProviderError):
    def __init__(self, code: str, message: str, field: str | None) -> None:
        super().__init__(f"{code}: {message}" + (f" (field {field})" if field else ""))
        self.code, self.message, self.field = code, message, field


class Unauthorized(ProviderError):
    pass


class Throttled(ProviderError):
    def __init__(self, retry_after: float) -> None:
        super().__init__(f"throttled, retry after {retry_after:.1f}s")
        self.retry_after = retry_after


class NotFound(ProviderError):
    pass


class Unavailable(ProviderError):
    pass


class OutcomeUnknown(ProviderError):
    pass
