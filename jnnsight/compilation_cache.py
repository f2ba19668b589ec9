"""JAX's persistent compilation cache, on by default in a user cache folder.

Compiling the forward with a block's edits is what an interactive user waits
for; with the cache on, a new Python process running the same programs loads
them from disk instead of compiling again. jnnsight turns it on at import,
unless the user configured a cache folder already or set
``JNNSIGHT_COMPILATION_CACHE=0``. The folder is ``$JNNSIGHT_CACHE_DIR`` or
``$XDG_CACHE_HOME/jnnsight/xla`` (``~/.cache/jnnsight/xla``).

Example::

    >>> import jnnsight, jax
    >>> jax.config.jax_compilation_cache_dir        # doctest: +SKIP
    '/home/me/.cache/jnnsight/xla'
"""

from __future__ import annotations

import os
from pathlib import Path

import jax


def default_folder() -> Path:
    if os.environ.get("JNNSIGHT_CACHE_DIR"):
        return Path(os.environ["JNNSIGHT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jnnsight" / "xla"


def enable() -> Path | None:
    """Turn the cache on (see the module docstring); the folder used, or None."""
    if os.environ.get("JNNSIGHT_COMPILATION_CACHE", "1") == "0":
        return None
    if jax.config.jax_compilation_cache_dir:
        return Path(jax.config.jax_compilation_cache_dir)
    folder = default_folder()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None  # a read-only home: run without the cache
    jax.config.update("jax_compilation_cache_dir", str(folder))
    # Cache every program that took a tenth of a second to compile, not only those over 1 s.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
    return folder
