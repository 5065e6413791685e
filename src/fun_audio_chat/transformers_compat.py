"""The one place where the transformers 5.x releases this library supports differ for it.

transformers 5.24 renamed the key/value cache from ``past_key_values`` to ``cache``: model outputs declare a
``cache`` field (``output.past_key_values`` stays readable as a deprecated alias until 5.40, but constructing an
output with ``past_key_values=`` fails for subclasses), model ``forward`` methods take ``cache=``, and
``generate()`` keeps it under ``model_kwargs["cache"]``. Releases up to 5.23 use ``past_key_values`` everywhere.

Code elsewhere never spells either name when it builds outputs or passes a cache on: it uses :data:`CACHE_NAME`,
and it reads a cache with :func:`cache_of`.
"""

from __future__ import annotations

from typing import Any

from transformers.modeling_outputs import BaseModelOutputWithPast

#: The keyword under which this transformers release passes and returns the key/value cache.
CACHE_NAME = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
#: The other spelling, accepted from callers for compatibility.
LEGACY_CACHE_NAME = "past_key_values" if CACHE_NAME == "cache" else "cache"


def cache_of(container: Any) -> Any:
    """The cache held by a model output or a ``model_kwargs`` dict, whatever the release calls it."""
    if isinstance(container, dict):
        found = container.get(CACHE_NAME)
        return found if found is not None else container.get(LEGACY_CACHE_NAME)
    return getattr(container, CACHE_NAME, None)


def pop_cache_argument(explicit: Any, kwargs: dict) -> Any:
    """The cache a ``forward`` caller gave, under either name (removed from ``kwargs``); both at once is an error."""
    other = kwargs.pop("cache", None)
    if explicit is not None and other is not None and explicit is not other:
        raise ValueError("Pass the key/value cache once, as `cache` or `past_key_values`, not both.")
    return explicit if explicit is not None else other


__all__ = ["CACHE_NAME", "LEGACY_CACHE_NAME", "cache_of", "pop_cache_argument"]
