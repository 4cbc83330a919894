"""Where callers of earlier versions import the client library from: ``from service.client import ...``.

The library is its own distribution now, ``sign-in-tokens-client`` (import ``sign_in_tokens_client``),
which installs without the worker's dependencies; this module keeps the old import path working.
"""

from sign_in_tokens_client.client import *  # noqa: F403 - the library's public names, as its __all__ lists them
from sign_in_tokens_client.client import __all__  # noqa: F401 - re-exported: star imports and mypy read it
