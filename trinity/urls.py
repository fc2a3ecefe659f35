"""Webhook URLs: checked once when the setting is read, printed only redacted.

The URL may carry credentials (userinfo, a token in the query, or in the path as
Slack's and Discord's webhooks do), so it is only ever printed through
:func:`redact_url`, which keeps scheme, host and port.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from trinity.errors import ConfigError

ENV_VAR = "TRINITY_ALERT_WEBHOOK"
SCHEMES = ("http", "https")


def redact_url(url: str) -> str:
    """``url`` safe to print: scheme, host and port; userinfo, path and query masked.

    ``https://user:pw@hooks.example.com:8443/T0/B0/secret?token=x`` becomes
    ``https://***@hooks.example.com:8443/***?***``. Never raises; text that is not a
    URL with a scheme and a host becomes ``<invalid URL>`` (it may be a pasted secret).
    """
    try:
        parts = urlsplit(url.strip())
        host = parts.hostname
        port = parts.port
    except (ValueError, TypeError, AttributeError):
        return "<invalid URL>"
    if not parts.scheme or not host or not parts.scheme.isascii():
        return "<invalid URL>"
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    userinfo = "***@" if "@" in parts.netloc else ""
    hostport = f"{host}:{port}" if port is not None else host
    path = parts.path if parts.path in ("", "/") else "/***"
    query = "?***" if parts.query else ""
    return f"{parts.scheme.lower()}://{userinfo}{hostport}{path}{query}"


def validate_webhook_url(url: str, *, name: str = ENV_VAR) -> str:
    """The webhook URL, stripped; :class:`ConfigError` unless it is http(s) with a host.

    Messages name ``name`` and show the URL only through :func:`redact_url`.
    """
    if not isinstance(url, str):
        raise ConfigError(f"{name} must be a string URL, got {type(url).__name__}")
    text = url.strip()
    if not text:
        raise ConfigError(f"{name} is empty: set it to an http:// or https:// URL, or unset it")
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in text):
        raise ConfigError(f"{name} contains whitespace or control characters: "
                          f"{redact_url(text)}")
    try:
        parts = urlsplit(text)
    except ValueError:
        raise ConfigError(f"{name} is not a valid URL") from None
    scheme = parts.scheme.lower()
    if not scheme or not parts.netloc:
        raise ConfigError(f"{name} must be an absolute http:// or https:// URL "
                          "(scheme and host, e.g. https://hooks.example.com/alerts)")
    if scheme not in SCHEMES:
        raise ConfigError(f"{name} must use http:// or https://, not {scheme}:// "
                          f"({redact_url(text)})")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"{name} has an invalid port: {redact_url(text)}") from None
    if not parts.hostname:
        raise ConfigError(f"{name} has no host: {redact_url(text)}")
    if port == 0:
        raise ConfigError(f"{name} has an invalid port 0: {redact_url(text)}")
    import httpx  # only when a webhook is configured

    try:
        httpx.URL(text)
    except (httpx.InvalidURL, ValueError, TypeError):
        raise ConfigError(f"{name} is not a valid URL: {redact_url(text)}") from None
    return text
