"""``prioqd web``: the dashboard, a process of its own that reads and acts through
Redis only (``prioqd.admin``), served by uvicorn with Starlette.

Security, in short (docs/design.md has the reasoning):

- It listens on localhost by default; remote access goes through a reverse proxy.
- Requests whose Host header is not localhost, the listen address or one of
  ``[web] allowed_hosts`` get 400 (DNS rebinding: reading needs no sign-in).
- Reading needs nothing. Every action (pause, resume, cancel, requeue, purge) is a
  POST that needs a sign-in with the token from ``[web] token_file`` (or the
  ``web-token`` credential) and a CSRF token bound to the browser's cookie.
- ``--read-only`` renders no action and refuses every POST.
- Templates are autoescaped (Jinja2), and a Content-Security-Policy allows no
  inline script: a payload holding ``<script>`` is shown as text.
"""

from __future__ import annotations

import os

from prioqd.config import Config, parse_listen
from prioqd.errors import ConfigError

TOKEN_CREDENTIAL = "web-token"
#: A shorter token is refused: it stands between the network and "purge".
MIN_TOKEN_LENGTH = 16


def load_token(cfg: Config) -> str | None:
    """The action token: ``[web] token_file``, else the ``web-token`` credential
    (``$CREDENTIALS_DIRECTORY``), else None. A named file that cannot be read, or a
    token that is too short, is a configuration error."""
    path = cfg.web.token_file
    explicit = bool(path)
    if not path:
        directory = os.environ.get("CREDENTIALS_DIRECTORY")
        if not directory:
            return None
        path = os.path.join(directory, TOKEN_CREDENTIAL)
        if not os.path.exists(path):
            return None
    try:
        with open(path, encoding="utf-8") as fh:
            token = fh.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        where = "web.token_file" if explicit else f"credential {TOKEN_CREDENTIAL}"
        raise ConfigError(cfg.path, where, f"cannot read {path}: {exc}") from None
    if not token:
        return None
    if len(token) < MIN_TOKEN_LENGTH:
        raise ConfigError(
            cfg.path,
            "web.token_file",
            f"the token in {path} is shorter than {MIN_TOKEN_LENGTH} characters "
            "(make one with: openssl rand -hex 32)",
        )
    return token


def serve(cfg: Config, *, listen: str | None = None, read_only: bool = False) -> int:
    """Run the dashboard until SIGTERM/SIGINT; the exit status."""
    import uvicorn

    from prioqd.web.app import create_app

    address = listen or cfg.web.listen
    try:
        host, port = parse_listen(address)
    except ValueError as exc:
        key = "--listen" if listen else "web.listen"
        raise ConfigError(cfg.path, key, f"{exc}, got {address!r}") from None
    token = None if read_only else load_token(cfg)
    if token is None and not read_only:
        raise ConfigError(
            cfg.path,
            "web.token_file",
            "no token for actions: set [web] token_file, or the web-token credential "
            "(LoadCredential=), or pass --read-only",
        )
    app = create_app(cfg, token=token, read_only=read_only, listen_host=host)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            loop="uvloop",
            http="h11",
            lifespan="on",
            proxy_headers=True,
            forwarded_allow_ips="127.0.0.1,::1",
            server_header=False,
            log_level="info",
        )
    )
    server.run()
    return 0 if server.started else 1
