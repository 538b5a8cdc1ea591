"""Who may do what: API tokens, users and their roles, permissions with wildcards.

The server's config file (``--config``) names users, each with a token (given as
``${VAR}``, read from ``token_file`` such as a mounted Kubernetes secret) and roles; roles
grant ``resource:action`` permissions as the seed's ``roles:`` block, ``*`` matching any
resource or action::

    users:
      alice: {token: "${ALICE_TOKEN}", roles: [admin]}
      ci: {token_file: /run/secrets/ci-token, roles: [operator]}
    roles:                       # optional: these four are the defaults
      admin: {permissions: ["workflow:*", "connector:*", "system:*"]}

Tokens are compared in constant time and must be at least 24 characters.
"""

from __future__ import annotations

import hmac
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

MIN_TOKEN = 24
DEFAULT_ROLES: dict[str, list[str]] = {
    "admin": ["workflow:*", "connector:*", "system:*"],
    "operator": ["workflow:read", "workflow:execute", "connector:read"],
    "developer": ["workflow:read", "workflow:create", "workflow:update", "connector:read"],
    "viewer": ["workflow:read", "connector:read"],
}


@dataclass(frozen=True)
class User:
    """An authenticated caller."""

    name: str
    permissions: tuple[str, ...]

    def may(self, permission: str) -> bool:
        """Whether a grant of this user matches ``resource:action``."""
        resource, action = permission.split(":", 1)
        for grant in self.permissions:
            r, a = grant.split(":", 1)
            if r in ("*", resource) and a in ("*", action):
                return True
        return False


@dataclass
class Access:
    """The token table of a server."""

    users: dict[str, User] = field(default_factory=dict)  # by token

    def authenticate(self, token: str | None) -> User | None:
        """The user holding ``token``, if any (constant-time comparison)."""
        if not token:
            return None
        found = None
        for known, user in self.users.items():
            if hmac.compare_digest(known.encode(), token.encode()):
                found = user
        return found


def _expand(value: str, env: Mapping[str, str]) -> str:
    if value.startswith("${") and value.endswith("}"):
        # ${VAR} or ${VAR:-default}, as in workflows; the default is a token: never shown
        name, sep, default = value[2:-1].partition(":-")
        if name in env:
            return env[name]
        if sep:
            return default
        msg = f"variable {name} is not set"
        raise ValueError(msg)
    return value


def load(path: str | Path | None, env: Mapping[str, str] = os.environ,
         default_token_file: Path | None = None) -> Access:
    """The access table from a config file.

    Without one, a single admin whose token is created (once) in ``default_token_file``.
    """
    if path is None:
        if default_token_file is None:
            msg = "a server without --config needs a token file"
            raise ValueError(msg)
        if not default_token_file.exists():
            default_token_file.parent.mkdir(parents=True, exist_ok=True)
            default_token_file.write_text(secrets.token_urlsafe(32) + "\n")
            default_token_file.chmod(0o600)
        token = default_token_file.read_text().strip()
        return Access({token: User("admin", tuple(DEFAULT_ROLES["admin"]))})
    data: Any = yaml.safe_load(Path(path).read_text()) or {}
    roles = {**DEFAULT_ROLES, **{name: list(r.get("permissions", []))
                                 for name, r in (data.get("roles") or {}).items()}}
    access = Access()
    for name, spec in (data.get("users") or {}).items():
        if "token_file" in spec:
            token = Path(spec["token_file"]).read_text().strip()
        else:
            token = _expand(str(spec.get("token", "")), env)
        if len(token) < MIN_TOKEN:
            msg = f"user {name!r}: a token needs at least {MIN_TOKEN} characters"
            raise ValueError(msg)
        unknown = [r for r in spec.get("roles", []) if r not in roles]
        if unknown:
            msg = f"user {name!r}: unknown role {unknown[0]!r} (known: {', '.join(roles)})"
            raise ValueError(msg)
        perms = tuple(p for r in spec.get("roles", []) for p in roles[r])
        access.users[token] = User(str(name), perms)
    return access
