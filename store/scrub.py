"""One scrubber for anything printed from configuration. `AWS_ENDPOINT_URL=http://user:password@minio:9000`
is a common MinIO setup, and libraries put the URL they were given into their errors: every
message, log line and record that shows an endpoint or a URI goes through `scrub`."""
from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

# the userinfo stops at the first '/', '?', '#' or space, so an '@' later in a path or query is not taken for one
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/?#@\s\"'<>]*)@")
# the name is kept so a reader sees what was there
_QUERY_SECRET = re.compile(
    r"(?P<name>[?&;][^=&#\s\"'<>]*(?:password|passwd|pwd|secret|token|signature|credential|accesskey|access_key|"
    r"apikey|api_key|auth)[^=&#\s\"'<>]*=)(?P<value>[^&#\s\"'<>]*)", re.IGNORECASE)
HIDDEN = "***"


def scrub(text: str, *secrets: str | None) -> str:
    """`text` with every URL's password (a userinfo without one, often a token, entirely),
    every secret-named query value, and each of `secrets` replaced by ***."""
    text = _USERINFO.sub(_hide_userinfo, str(text))
    text = _QUERY_SECRET.sub(lambda m: m["name"] + HIDDEN, text)
    for secret in secrets:
        if secret:
            text = text.replace(secret, HIDDEN)
    return text


def without_userinfo(url: str) -> str:
    """`url` without `user:password@`."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _hide_userinfo(m: re.Match) -> str:
    user, colon, _ = m["userinfo"].partition(":")
    return f"{m['scheme']}{user}:{HIDDEN}@" if colon else f"{m['scheme']}{HIDDEN}@"
