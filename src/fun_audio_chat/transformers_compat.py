"""The cache-name helpers, kept under this name for the model modules that import them from here.

They live in :mod:`fun_audio_chat.framework_compat`, the one module where the package depends on framework
internals or release differences; import them from there.
"""

from __future__ import annotations

from .framework_compat import CACHE_NAME, LEGACY_CACHE_NAME, cache_of, pop_cache_argument

__all__ = ["CACHE_NAME", "LEGACY_CACHE_NAME", "cache_of", "pop_cache_argument"]
