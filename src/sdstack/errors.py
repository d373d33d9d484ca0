"""The one error base of sdstack: every user-facing failure is an :class:`SdstackError`.

``SdstackError`` is a ``ValueError`` so callers that caught ``ValueError`` before keep
working. The command line prints any ``SdstackError`` as ``sdstack: error: <message>`` and
exits with status 2; any other exception is a bug and keeps its traceback. Messages name
the thing that is wrong (file, key, option, value), what was expected, and the fix. This
module imports nothing heavy, so the prompt parser can use it without torch.
"""

from __future__ import annotations


class SdstackError(ValueError):
    """A user-facing failure: bad input, a bad file, a setting out of range."""


class UnknownNameError(SdstackError):
    """A name (sampler, emphasis mode, merge method, grid axis...) that is not registered.

    The message lists the nearest registered names (``difflib``).
    """


class SdstackWarning(UserWarning):
    """Something the user should know that does not stop the work: a file in a folder that
    could not be read, keys that matched nothing. The library emits it with
    ``warnings.warn``; the command line prints it as ``sdstack: warning: <message>``."""
