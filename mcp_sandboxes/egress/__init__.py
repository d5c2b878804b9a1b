"""Egress for network mode "model": a sandbox with no route out reaches its model API, this
server's agent endpoint and an allow-list of domains through a proxy the server runs on the
host, and never holds the real API key.

- `proxy`: the host-side HTTP proxy, one unix socket per sandbox (routes, credential swap,
  CONNECT allow-list, refusals reported).
- `forwarder`: builds and finds the tiny static forwarder that serves that socket on a
  loopback port inside the sandbox (`forward.c`).
- `plan`: what a session in mode "model" gets: routes, placeholders, the CLI's environment.
"""
