"""Credentials never persist: what is stored or printed carries storage options redacted.

The rule (README, "Credentials"):

- A key of a dict, at any depth, is credential-bearing when its name, lower-cased with `-`
  read as `_`, contains one of SECRET_WORDS (`key`, `secret`, `token`, `password`, `passwd`,
  `credential`, `auth`, `session`, `signature`, `private`, `cookie`, `sas`,
  `connection_string`). Its whole value, whatever its type (a string, a dict of a service
  account, a path to a token file), becomes REDACTED. So `key`, `secret`, `token`,
  `aws_access_key_id`, `aws_secret_access_key`, `aws_session_token`, `client_secret`,
  `credentials`, `password`, `sse_customer_key`, `headers.Authorization` all go; `endpoint_url`,
  `region_name`, `anon`, `project` stay (over-redacting a harmless key is accepted).
- A string value that is a URL with a password (`scheme://user:pw@host`) keeps the user and
  host; the password becomes REDACTED.
- `scrub(text)` replaces every secret value this process has seen (`remember` of the
  storage options, and of the environment variables whose names match the rule, e.g.
  AWS_SECRET_ACCESS_KEY) in free text: error lines, console lines, metrics, tracebacks. Values
  shorter than 8 characters are only redacted by key, not scrubbed from free text (they would
  mangle ordinary words and numbers, and metrics must stay exact).

Credentials from the environment are only ever read by the storage libraries themselves;
nothing here copies them anywhere.
"""

from __future__ import annotations

import json
import os
import re
import sys
import traceback

REDACTED = "<redacted>"
SECRET_WORDS = ("key", "secret", "token", "password", "passwd", "credential", "auth",
                "session", "signature", "private", "cookie", "sas", "connection_string")
_SECRET_RE = re.compile("|".join(SECRET_WORDS))
_URL_PASSWORD_RE = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^/:@\s]*:)(?P<pw>[^/@\s]+)@")
_MIN_SCRUB = 8
_seen: set[str] = set()


def is_secret_key(name) -> bool:
    """Whether a dict key names a credential (the rule in the module docstring)."""
    return isinstance(name, str) and bool(_SECRET_RE.search(name.lower().replace("-", "_")))


def redact(obj):
    """A copy of `obj` (JSON-like: dicts, lists, scalars) with credentials replaced."""
    if isinstance(obj, dict):
        return {k: REDACTED if is_secret_key(k) else redact(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        return _URL_PASSWORD_RE.sub(lambda m: m["head"] + REDACTED + "@", obj)
    return obj


def redact_options_text(text: str) -> str:
    """--storage_options as stored: the JSON text redacted; text that is not a JSON object
    (never valid options) is replaced as a whole, as it cannot be parsed to find the keys."""
    try:
        options = json.loads(text)
    except ValueError:
        return REDACTED
    if not isinstance(options, dict):
        return REDACTED
    return json.dumps(redact(options), sort_keys=True)


def redact_config_dict(config: dict) -> dict:
    """A stored config dict (maybe written by older code, with keys in clear) redacted: the
    storage options by the rule, URL passwords in every string. The run's own field names
    are not matched against the rule (`tokenizer_file` is no credential)."""
    config = {k: redact(v) if isinstance(v, str) else v for k, v in config.items()}
    if isinstance(config.get("storage_options"), str):
        config["storage_options"] = redact_options_text(config["storage_options"])
    elif isinstance(config.get("storage_options"), dict):
        config["storage_options"] = redact(config["storage_options"])
    return config


def _values(obj, under_secret: bool = False):
    """Every string/number value under a credential-bearing key of `obj`."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _values(v, under_secret or is_secret_key(k))
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _values(v, under_secret)
    elif isinstance(obj, str):
        if under_secret:
            yield obj
        for m in _URL_PASSWORD_RE.finditer(obj):
            yield m["pw"]
    elif under_secret and isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield str(obj)


def remember(options: dict | None = None, environ=None) -> None:
    """Note the secret values of `options` and of the environment (names matching the
    rule), so that `scrub` removes them from any text this process prints or stores."""
    environ = os.environ if environ is None else environ
    found = list(_values(options or {}))
    found += [v for k, v in environ.items() if is_secret_key(k)]
    _seen.update(v for v in found if len(v) >= _MIN_SCRUB)


def scrub(text: str) -> str:
    """`text` with every remembered secret value (longest first) replaced by REDACTED."""
    for value in sorted(_seen, key=len, reverse=True):
        if value in text:
            text = text.replace(value, REDACTED)
    return _URL_PASSWORD_RE.sub(lambda m: m["head"] + REDACTED + "@", text)


def install_excepthook() -> None:
    """Uncaught exceptions (main thread and other threads) print their traceback scrubbed."""
    def hook(exc_type, exc, tb):
        sys.stderr.write(scrub("".join(traceback.format_exception(exc_type, exc, tb))))
        sys.stderr.flush()

    def thread_hook(args):
        if args.exc_type is not SystemExit:
            hook(args.exc_type, args.exc_value, args.exc_traceback)

    import threading
    sys.excepthook = hook
    threading.excepthook = thread_hook
