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
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

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


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _UserSpec(_Strict):
    token: str | None = None
    token_file: str | None = None
    roles: list[str] = []

    @model_validator(mode="after")
    def _one_token(self) -> _UserSpec:
        if (self.token is None) == (self.token_file is None):
            msg = "give either 'token' or 'token_file'"
            raise ValueError(msg)
        return self


class _RoleSpec(_Strict):
    permissions: list[str]

    @field_validator("permissions")
    @classmethod
    def _grants(cls, grants: list[str]) -> list[str]:
        bad = [g for g in grants if g.count(":") != 1 or "" in g.split(":")]
        if bad:
            msg = f"a permission is 'resource:action' ('workflow:*'), not {bad[0]!r}"
            raise ValueError(msg)
        return grants


class _Config(_Strict):
    users: dict[str, _UserSpec] = {}
    roles: dict[str, _RoleSpec] = {}


def _parsed(data: Any) -> _Config:
    """The config file's content, or its first problem in one line (``users.bob.roles: ...``)."""
    try:
        return _Config.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = [str(p) for p in err["loc"]]
        where = ".".join(loc) or "the file"
        # Said in the file's terms; a token's value is never shown.
        if err["type"] in ("dict_type", "model_type"):
            what = {0: "a mapping of 'users' and 'roles'", 1: "a mapping of names",
                    2: "a mapping"}[min(len(loc), 2)]
            said = f"should be {what}, not {_kind(err['input'])}"
        elif err["type"] == "extra_forbidden":
            known = {1: _Config, 2: _UserSpec if loc[0] == "users" else _RoleSpec}.get(
                len(loc) - 1, _Config)
            said = f"unknown setting (known: {', '.join(known.model_fields)})"
        elif err["type"] == "string_type":
            said = f"should be text, not {_kind(err['input'])}"
        else:
            said = err["msg"].removeprefix("Value error, ")
        msg = f"{where}: {said}"
        raise ValueError(msg) from None


def _kind(value: Any) -> str:
    return {list: "a list", dict: "a mapping", str: "text", int: "a number", float: "a number",
            bool: "true/false"}.get(type(value), type(value).__name__)


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
    cfg = _parsed(yaml.safe_load(Path(path).read_text()) or {})
    roles = {**DEFAULT_ROLES, **{name: r.permissions for name, r in cfg.roles.items()}}
    access = Access()
    for name, spec in cfg.users.items():
        if spec.token_file is not None:
            token = Path(spec.token_file).read_text().strip()
        else:
            token = _expand(spec.token or "", env)
        if len(token) < MIN_TOKEN:
            msg = f"user {name!r}: a token needs at least {MIN_TOKEN} characters"
            raise ValueError(msg)
        unknown = [r for r in spec.roles if r not in roles]
        if unknown:
            msg = f"user {name!r}: unknown role {unknown[0]!r} (known: {', '.join(roles)})"
            raise ValueError(msg)
        perms = tuple(p for r in spec.roles for p in roles[r])
        if token in access.users:  # one would act, and be audited, as the other
            msg = (f"users {access.users[token].name!r} and {name!r} have the same token: "
                   "give each user a token of its own")
            raise ValueError(msg)
        access.users[token] = User(str(name), perms)
    return access
