"""Password masking as oslo.messaging applies it: ``oslo_utils.strutils.mask_password`` and
``mask_dict_password``, reproduced (oslo.utils 10; Apache-2.0, Copyright 2011 OpenStack
Foundation) so that tidings masks exactly what oslo.messaging masks without depending on
oslo.utils. The parity tests compare the two on the same inputs.

Used by the ``log`` notifier driver (oslo.messaging masks the whole message it logs) and for
contexts that oslo.messaging would not send at all (a plain dict, an object with only
``to_dict()``): tidings sends them with their secrets masked, see ``mask_context``.
"""

from __future__ import annotations

import collections.abc
import re
from typing import Any

__all__ = ["SANITIZE_KEYS", "mask_context", "mask_dict_password", "mask_password"]

SANITIZE_KEYS = (
    'adminpass', 'admin_pass', 'password', 'admin_password', 'auth_token', 'new_pass',
    'auth_password', 'secret_uuid', 'secret', 'sys_pswd', 'token', 'configdrive',
    'chappassword', 'encrypted_key', 'private_key', 'fernetkey', 'sslkey', 'passphrase',
    'cephclusterfsid', 'octaviaheartbeatkey', 'rabbitcookie', 'cephmanilaclientkey',
    'pacemakerremoteauthkey', 'designaterndckey', 'cephadminkey', 'heatauthencryptionkey',
    'cephclientkey', 'keystonecredential', 'barbicansimplecryptokek', 'cephrgwkey',
    'swifthashsuffix', 'migrationsshkey', 'cephmdskey', 'cephmonkey', 'chapsecret',
)

_FORMAT_PATTERNS_1 = [r'(%(key)s[0-9]*\s*[=]\s*)[^\s^\'^\"]+']
_FORMAT_PATTERNS_2 = [
    r'(%(key)s[0-9]*\s*[=]\s*[\"\'])[^\"\']*([\"\'])',
    r'(%(key)s[0-9]*\s*[=]\s*[\"])[^\"]*([\"])',
    r'(%(key)s[0-9]*\s*[=]\s*[\'])[^\']*([\'])',
    r'(%(key)s[0-9]*\s+[\"\'])[^\"\']*([\"\'])',
    r'([-]{2}%(key)s[0-9]*\s+)[^\'^\"^=^\s]+([\s]*)',
    r'(<%(key)s[0-9]*>)[^<]*(</%(key)s[0-9]*>)',
    r'([\"\']%(key)s[0-9]*[\"\']\s*:\s*[\"\'])[^\"\']*'
    r'([\"\'])',
    r'([\'"][^"\']*%(key)s[0-9]*[\'"]\s*:\s*u?[\'"])[^\"\']*'
    r'([\'"])',
    r'([\'"][^\'"]*%(key)s[0-9]*[\'"]\s*,\s*\'--?[A-z]+'
    r'\'\s*,\s*u?[\'"])[^\"\']*([\'"])',
    r'(%(key)s[0-9]*\s*--?[A-z]+\s*)\S+(\s*)',
]
_FORMAT_PATTERNS_WILDCARD = [
    r'([\'\"][^\"\']*%(key)s[0-9]*[\'\"]\s*:\s*u?[\'\"].*[\'\"])[^\"\']*([\'\"])'
]

_FLAGS = re.DOTALL | re.IGNORECASE
_patterns: dict[str, tuple[list[re.Pattern[str]], ...]] = {}


def _patterns_of(key: str) -> tuple[list[re.Pattern[str]], ...]:
    """(patterns 2, patterns 1, wildcard patterns) of one key, compiled on first use (420
    regular expressions in all: compiling them at import would cost a tenth of a second)."""
    found = _patterns.get(key)
    if found is None:
        found = tuple([re.compile(p % {'key': key}, _FLAGS) for p in group]
                      for group in (_FORMAT_PATTERNS_2, _FORMAT_PATTERNS_1,
                                    _FORMAT_PATTERNS_WILDCARD))
        _patterns[key] = found
    return found

# Any sanitize key in a lower-cased string: one C search instead of 35 ``in`` tests.
_ANY_KEY = re.compile("|".join(re.escape(k) for k in SANITIZE_KEYS))


def mask_password(message: object, secret: str = "***") -> str:
    """``oslo_utils.strutils.mask_password``: mask the values of password-like keys that
    appear in a string (``password=...``, ``"token": "..."``, ``--password x``, ...)."""
    if isinstance(message, bytes):
        message = message.decode(errors='ignore')
    else:
        message = str(message)
    low = message.lower()
    if _ANY_KEY.search(low) is None:
        return message
    substitute1 = r'\g<1>' + secret
    substitute2 = r'\g<1>' + secret + r'\g<2>'
    substitute_wildcard = r'\g<1>'
    for key in SANITIZE_KEYS:
        if key in message.lower():
            patterns_2, patterns_1, wildcard = _patterns_of(key)
            for pattern in patterns_2:
                message = re.sub(pattern, substitute2, message)
            for pattern in patterns_1:
                message = re.sub(pattern, substitute1, message)
            for pattern in wildcard:
                message = re.sub(pattern, substitute_wildcard, message)
    return message


def _deep_mask(value: object, secret: str) -> object:
    if isinstance(value, collections.abc.Mapping):
        return mask_dict_password(value, secret=secret)
    if isinstance(value, str):
        return mask_password(value, secret=secret)
    if isinstance(value, collections.abc.Collection):
        items = [_deep_mask(v, secret=secret) for v in value]
        return items if isinstance(value, list) else tuple(items)
    return value


_key_is_secret: dict[str, bool] = {}  # per key name (bounded: see _remember)
_value_is_clean: dict[str, bool] = {}  # per short string value: nothing password-like in it
_CACHE_LIMIT = 4096


def _secret_key(k: str) -> bool:
    known = _key_is_secret.get(k)
    if known is None:
        known = _ANY_KEY.search(k.lower()) is not None
        if len(_key_is_secret) < _CACHE_LIMIT:
            _key_is_secret[k] = known
    return known


def _clean_value(v: str) -> bool:
    """True if ``mask_password(v)`` would leave ``v`` as it is (no sanitize key in it)."""
    clean = _ANY_KEY.search(v.lower()) is None
    if len(v) <= 256:
        if len(_value_is_clean) >= _CACHE_LIMIT:
            _value_is_clean.clear()  # values change (request ids): start over
        _value_is_clean[v] = clean
    return clean


def mask_dict_password(dictionary: collections.abc.Mapping[Any, Any],
                       secret: str = "***") -> dict[Any, Any]:
    """``oslo_utils.strutils.mask_dict_password``: a copy of ``dictionary`` where values under
    password-like keys are ``secret``, strings are masked with :func:`mask_password`, and
    nested mappings and collections are masked recursively."""
    if not isinstance(dictionary, collections.abc.Mapping):
        raise TypeError(f"Expected a Mapping, got {type(dictionary)} instead.")
    out: dict[Any, Any] = {}
    for k, v in dictionary.items():
        if isinstance(v, collections.abc.Mapping):
            out[k] = mask_dict_password(v, secret=secret)
            continue
        if isinstance(k, str) and _secret_key(k):
            out[k] = secret
        elif isinstance(v, str):
            out[k] = mask_password(v, secret=secret)
        elif isinstance(v, collections.abc.Collection):
            out[k] = _deep_mask(v, secret=secret)
        else:
            out[k] = v
    return out


_clean_items: set[tuple[Any, Any]] = set()  # (key, value) pairs known to need no masking


def mask_context(ctxt: collections.abc.Mapping[Any, Any]) -> dict[Any, Any]:
    """A context dict safe to send: ``mask_dict_password`` of it. Cheap in the common case:
    (key, value) pairs already seen to need no masking (a string key naming no secret, a value
    that is a string with nothing password-like in it, a number, a boolean or None) are
    remembered, and a context made only of them is copied as it is."""
    try:
        if ctxt.items() <= _clean_items:  # one C loop of set look-ups
            return dict(ctxt)
    except TypeError:  # an unhashable value (a list, a dict): never remembered
        return mask_dict_password(ctxt)
    return _mask_context_slow(ctxt)


def _mask_context_slow(ctxt: collections.abc.Mapping[Any, Any]) -> dict[Any, Any]:
    items = []
    for k, v in ctxt.items():
        if type(k) is not str or _secret_key(k):
            return mask_dict_password(ctxt)
        if type(v) is str:
            if len(v) >= 5 and not (_value_is_clean.get(v) or _clean_value(v)):
                return mask_dict_password(ctxt)
        elif not (v is None or type(v) in (int, float, bool)):
            return mask_dict_password(ctxt)
        items.append((k, v))
    if len(_clean_items) + len(items) > _CACHE_LIMIT:
        _clean_items.clear()  # values change (request ids): start over
    _clean_items.update(items)
    return dict(ctxt)
