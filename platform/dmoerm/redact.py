"""Credentials never shown: masking them inside any text (URLs with user:password, signed query strings)
before it is logged, printed, raised or written to MLflow. Pure, no imports beyond ``re``."""

from __future__ import annotations

import re

_URL_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@]+@")
_SECRET_QUERY = re.compile(r"(?P<name>[?&][^=&\s#]*(?:key|token|secret|password|signature|credential)[^=&\s#]*=)"
                           r"[^&\s#]+", re.IGNORECASE)


def redact_credentials(text: str) -> str:
    """``text`` with credentials inside URLs masked: ``https://user:pass@host`` -> ``https://***@host``, and
    the values of secret-looking query parameters (``?token=...``, ``X-Amz-Signature=...``) -> ``***``."""
    return _SECRET_QUERY.sub(r"\g<name>***", _URL_USERINFO.sub(r"\g<scheme>***@", text))
