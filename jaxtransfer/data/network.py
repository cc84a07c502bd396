"""Is the network there? One quick probe before a download, so that an offline machine fails in
seconds with what to do instead, not after minutes of a download manager's retries."""

from __future__ import annotations

import socket
import threading
import urllib.parse
import urllib.request

PROBE_SECONDS = 5.0


def unreachable(url: str, timeout: float = PROBE_SECONDS) -> str:
  """'' if a TCP connection to `url`'s host opens within `timeout` seconds (through the proxy
  the environment names for it, as downloads go), else why not, in a few words.

  Name resolution is bounded too (it runs in a thread: offline resolvers can hang far longer
  than a socket's timeout)."""
  parts = urllib.parse.urlsplit(url)
  host, port = parts.hostname, parts.port or (443 if parts.scheme == 'https' else 80)
  proxy = urllib.request.getproxies().get(parts.scheme)
  if proxy and not urllib.request.proxy_bypass(host):
    proxy_parts = urllib.parse.urlsplit(proxy if '://' in proxy else f'http://{proxy}')
    host, port = proxy_parts.hostname, proxy_parts.port or 80

  outcome: list[str] = []

  def connect() -> None:
    try:
      with socket.create_connection((host, port), timeout=timeout):
        outcome.append('')
    except OSError as e:
      outcome.append(f'cannot reach {host}:{port} ({e.strerror or e or type(e).__name__})')

  # A daemon thread, not an executor: one stuck in name resolution must not hold up exit.
  thread = threading.Thread(target=connect, daemon=True)
  thread.start()
  thread.join(2 * timeout)
  return outcome[0] if outcome else f'no answer from {host}:{port} within {2 * timeout:.0f} s'
