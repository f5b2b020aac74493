"""`from worker.signing import verify_signature`, as callback receivers are told to write,
keeps working: the signing rules themselves are worker/core/signing.py."""

from worker.core.signing import sign as sign
from worker.core.signing import verify_signature as verify_signature
