"""An exception as the short line that a one-line error message quotes.

Standard library only, so every floor of the package can use it.
"""

from __future__ import annotations

# Longest quoted error; a longer one is cut and ends in '...'.
MAX_CHARS = 300


def one_line(error: BaseException, named: bool = False) -> str:
  """`error` as one line, for quoting after a message of our own.

  By default every line of it joined (orbax's and tensorstore's errors spread one cause over
  several), tensorstore's appended JSON spec cut and at most MAX_CHARS kept. With `named`, for
  errors raised by a user's code: its type's name and its first line alone (the later lines of
  such an error are tracebacks and hints, and its type, e.g. a KeyError, is half the message).
  """
  if named:
    first = (str(error).strip().splitlines() or [''])[0]
    return f'{type(error).__name__}: {first}' if first else type(error).__name__
  text = ' '.join(str(error).split()).split(' [tensorstore_spec=')[0] or type(error).__name__
  return text if len(text) <= MAX_CHARS else text[:MAX_CHARS - 3] + '...'
