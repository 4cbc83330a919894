"""Where callers import the client library from: ``from service.client import SignInTokenClient``.

The library lives in ``service.callers.client`` beside the bulk tool; this module keeps the import
path callers already use.
"""

from service.callers.client import *  # noqa: F403 - the library's public names, as its __all__ lists them
from service.callers.client import __all__  # noqa: F401 - re-exported: star imports and mypy read it
