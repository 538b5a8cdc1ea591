"""Redis destination: hashes, strings, lists, sets, sorted sets or streams, pipelined.

Every record becomes one command on the key rendered from ``key_template``; a flushed
batch (``batch: {size, flush_interval}``) is sent as one pipeline. With ``fields`` only
the mapped fields are written, otherwise the whole record without ``_meta``. In a
``hash``, a field whose value is null is removed (HDEL, in the same pipeline) and a field
the record lacks is left as it is, so partial records (a CDC update without its unchanged
TOAST columns) update only what they carry.

Replays after a crash (bytewax resumes from the last snapshot) are harmless for
``hash``, ``string``, ``set`` and ``sorted_set``: writing the same value again changes
nothing, so these are effectively exactly-once. ``list`` and ``stream`` append, so a
replay appends again: they are **at-least-once**. A record whose ``_meta.op`` is
``delete`` (CDC) deletes its key for ``hash`` and ``string``, and removes its member for
``set`` and ``sorted_set``; a CDC ``truncate`` is ignored (it names no key).

Lost connections are retried with backoff per the workflow's ``retry`` policy, sending
the whole pipeline again. A command Redis refuses (``WRONGTYPE``: the key holds another
structure) fails its record alone, which follows the destination's ``error_handling``.
"""

from __future__ import annotations

from typing import Any, Literal

from bytewax.dataflow import Stream
from pydantic import Field, model_validator

from dataflare.config import Duration, Secret, Strict
from dataflare.connectors.batching import Flush, Unwritten, buffered_output
from dataflare.lineage import Dataset
from dataflare.record_schema import FieldType, SchemaContext
from dataflare.records import META, Failed, get_path, getter
from dataflare.registry import BuildContext, destination
from dataflare.retry import Interrupted, call_with_retry
from dataflare.template import compile_template, placeholders


class FieldMapping(Strict):
    """One field written to Redis."""

    source: str = Field(description="Dotted path in the record.")
    destination: str = Field(description="Hash field (or key in the JSON value) to write.")


class RedisDestinationConfig(Strict):
    """Write records to Redis."""

    url: Secret | None = Field(
        None, description="redis://[user:password@]host:port/db (instead of host/port/db)."
    )
    host: str = Field("localhost", description="Server host.")
    port: int = Field(6379, ge=1, le=65535, description="Server port.")
    db: int = Field(0, ge=0, description="Database number.")
    username: str | None = Field(None, description="ACL user name.")
    password: Secret | None = Field(None, description="Password.")
    data_structure: Literal["hash", "string", "list", "set", "sorted_set", "stream"] = Field(
        "hash", description="Redis type written per record."
    )
    key_template: str = Field(description="Key of each record, e.g. 'customer:{{user.id}}'.")
    fields: list[FieldMapping] = Field(
        default_factory=list, description="Fields to write; the whole record when empty."
    )
    value_field: str | None = Field(
        None,
        description="string/list/set/sorted_set: path of the value to write; the JSON of "
        "the (mapped) record when absent.",
    )
    score_field: str | None = Field(None, description="sorted_set: path of the numeric score.")
    ttl: Duration | None = Field(None, description="Expiry set on every written key.")
    stream_max_length: int | None = Field(
        None, ge=1, description="stream: approximate cap of entries (XADD MAXLEN ~)."
    )
    socket_timeout: Duration = Field(10.0, gt=0, description="Timeout of one network operation.")

    @model_validator(mode="after")
    def _check(self) -> RedisDestinationConfig:
        kind, given = self.data_structure, self.model_fields_set
        if kind == "sorted_set" and not self.score_field:
            msg = "data_structure 'sorted_set' needs 'score_field'"
            raise ValueError(msg)
        idle = [name for name, used in (
            ("value_field", kind in ("string", "list", "set", "sorted_set")),
            ("score_field", kind == "sorted_set"),
            ("stream_max_length", kind == "stream")) if name in given and not used]
        if idle:
            msg = (f"{', '.join(map(repr, idle))} has no effect with data_structure "
                   f"{kind!r}")
            raise ValueError(msg)
        if self.url is not None and given & {"host", "port", "db", "username", "password"}:
            msg = "give 'url' or host/port/db/username/password, not both"
            raise ValueError(msg)
        if self.ttl is not None and self.ttl < 0.001:
            msg = "ttl must be at least 1ms (Redis expires keys in milliseconds)"
            raise ValueError(msg)
        return self

    def client(self) -> Any:
        """A ``redis.Redis`` client (it connects lazily)."""
        import redis

        common: dict[str, Any] = {
            "socket_timeout": self.socket_timeout,
            "socket_connect_timeout": self.socket_timeout,
        }
        if self.url is not None:
            return redis.Redis.from_url(self.url.get_secret_value(), **common)
        return redis.Redis(
            host=self.host,
            port=self.port,
            db=self.db,
            username=self.username,
            password=self.password.get_secret_value() if self.password else None,
            **common,
        )


class _Refused(Exception):
    """What Redis refuses whatever the retries (a wrong password)."""


Command = tuple[str, str, Any]
"""``(operation, key, argument)``: one Redis write prepared from a record."""

_ABSENT = object()


class _Commands:
    """Turns records into commands; rejects records that cannot be written."""

    def __init__(self, step: str, cfg: RedisDestinationConfig) -> None:
        import orjson

        self.step = step
        self.cfg = cfg
        self.dumps = orjson.dumps
        self.key = compile_template(cfg.key_template)
        self.key_parts = [(path, getter(path)) for path in placeholders(cfg.key_template)]
        self.fields = [(f.source, getter(f.source), f.destination) for f in cfg.fields]
        self.value = getter(cfg.value_field) if cfg.value_field else None
        self.score = getter(cfg.score_field) if cfg.score_field else None

    def _mapped(self, rec: dict[str, Any]) -> dict[str, Any]:
        if self.fields:
            return {dest: get(rec) for _, get, dest in self.fields}
        return {k: v for k, v in rec.items() if k != META}

    def _hash_fields(self, rec: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """Fields to set and null fields to remove; a field the record lacks is neither."""
        if self.fields:
            pairs = [(dest, get_path(rec, path, _ABSENT)) for path, _, dest in self.fields]
        else:
            pairs = [(k, v) for k, v in rec.items() if k != META]
        values = {k: self._scalar(v) for k, v in pairs if v is not None and v is not _ABSENT}
        return values, [k for k, v in pairs if v is None]

    def _scalar(self, value: Any) -> str | bytes | int | float:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, str | bytes | int | float):
            return value
        return self.dumps(value, default=str)

    def _member(self, rec: dict[str, Any]) -> str | bytes | int | float:
        if self.value is not None:
            return self._scalar(self.value(rec))
        return self.dumps(self._mapped(rec))

    def command(self, rec: dict[str, Any]) -> Command:
        kind = self.cfg.data_structure
        for path, get in self.key_parts:
            if get(rec) in (None, ""):
                msg = (
                    f"step {self.step!r}: key_template {self.cfg.key_template!r} needs "
                    f"'{path}', which the record lacks"
                )
                raise ValueError(msg)
        key = self.key(rec)
        meta = rec.get(META)
        delete = isinstance(meta, dict) and meta.get("op") == "delete"
        if kind == "hash":
            return ("del", key, None) if delete else ("hset", key, self._hash_fields(rec))
        if kind == "string":
            return ("del", key, None) if delete else ("set", key, self._member(rec))
        if kind == "list":
            return ("rpush", key, self._member(rec))
        if kind == "set":
            return ("srem" if delete else "sadd", key, self._member(rec))
        if kind == "sorted_set":
            assert self.score is not None
            member = self._member(rec)
            if delete:
                return ("zrem", key, member)
            score = self.score(rec)
            if isinstance(score, bool) or not isinstance(score, int | float):
                msg = (
                    f"step {self.step!r}: score field {self.cfg.score_field!r} is "
                    f"{type(score).__name__} ({score!r}), expected a number"
                )
                raise ValueError(msg)
            return ("zadd", key, {member: score})
        fields = {k: self._scalar(v) for k, v in self._mapped(rec).items() if v is not None}
        return ("xadd", key, fields)

    def prepare(self, batch: list[Any]) -> tuple[list[tuple[Any, Command]], list[Failed]]:
        """``(record, command)`` pairs, and the records no command can be made of."""
        out: list[tuple[Any, Command]] = []
        errs: list[Failed] = []
        for rec in batch:
            meta = rec.get(META) if isinstance(rec, dict) else None
            if isinstance(meta, dict) and meta.get("op") == "truncate":
                continue  # a CDC truncate names no key: keys are only removed by deletes
            try:
                out.append((rec, self.command(rec)))
            except (TypeError, ValueError) as exc:
                message = str(exc) if str(exc).startswith("step ") else (
                    f"step {self.step!r}: cannot write record to redis: {exc}"
                )
                meta = rec.get(META, {}) if isinstance(rec, dict) else {}
                errs.append(Failed(self.step, type(exc).__name__, message, rec, meta))
        return out, errs


class _RedisWriter:
    """Sends each flush as one pipeline (see :class:`dataflare.connectors.batching.Writer`)."""

    def __init__(self, step: str, cfg: RedisDestinationConfig, retry: Any) -> None:
        self.step = step
        self.cfg = cfg
        self.retry = retry
        self.client: Any = None

    def _send(self, items: list[tuple[Any, Command]]) -> list[Failed]:
        import redis

        if self.client is None:
            self.client = self.cfg.client()
        pipe = self.client.pipeline(transaction=False)
        expire = int(self.cfg.ttl * 1000) if self.cfg.ttl else None
        owners: list[int] = []  # the item of each command in the pipeline
        for i, (_rec, command) in enumerate(items):
            self._queue(pipe, command, expire)
            owners.extend([i] * (len(pipe) - len(owners)))
        refused: dict[int, Failed] = {}
        for i, result in zip(owners, pipe.execute(raise_on_error=False), strict=True):
            if isinstance(result, redis.ResponseError) and i not in refused:
                rec = items[i][0]
                meta = rec.get(META, {}) if isinstance(rec, dict) else {}
                message = f"step {self.step!r}: redis refused {items[i][1][0]}: {result}"
                refused[i] = Failed(self.step, type(result).__name__, message, rec, meta)
        # A TTL once written (SET carries its own), not on a key whose write was refused:
        # that key holds something else.
        expiring = [cmd[1] for i, (_rec, cmd) in enumerate(items)
                    if i not in refused and cmd[0] not in ("set", "del")]
        if expire and expiring:
            ttl_pipe = self.client.pipeline(transaction=False)
            for key in expiring:
                ttl_pipe.pexpire(key, expire)
            ttl_pipe.execute()
        return list(refused.values())

    def _queue(self, pipe: Any, command: Command, expire: int | None) -> None:
        """Add the pipeline command(s) of one record."""
        op, key, arg = command
        if op == "hset":
            values, nulls = arg
            if values:
                pipe.hset(key, mapping=values)
            if nulls:
                pipe.hdel(key, *nulls)
        elif op == "set":
            pipe.set(key, arg, px=expire)
        elif op == "del":
            pipe.delete(key)
        elif op == "rpush":
            pipe.rpush(key, arg)
        elif op == "sadd":
            pipe.sadd(key, arg)
        elif op == "srem":
            pipe.srem(key, arg)
        elif op == "zadd":
            pipe.zadd(key, arg)
        elif op == "zrem":
            pipe.zrem(key, arg)
        elif op == "xadd":
            maxlen = self.cfg.stream_max_length
            pipe.xadd(key, arg or {"_": ""}, maxlen=maxlen, approximate=True)

    def _reset(self, _exc: BaseException) -> None:
        if self.client is not None:
            self.client.close()
        self.client = None

    def write_flush(self, flush: Flush) -> list[Failed]:
        """Send a flush as one pipeline; the records whose commands Redis refused."""
        import redis

        transient = (redis.ConnectionError, redis.TimeoutError)
        what = f"step {self.step!r}: write {len(flush.items)} record(s) to redis"

        def send() -> list[Failed]:
            try:
                return self._send(flush.items)
            except redis.AuthenticationError as exc:  # a ConnectionError no retry mends
                said = f"{type(exc).__name__}: {exc}"
                raise _Refused(said) from None

        try:
            return call_with_retry(what, send, self.retry, transient=transient,
                                   on_retry=self._reset)
        except _Refused as exc:
            msg = f"{what} failed: {exc}"
            raise RuntimeError(msg) from None
        except Interrupted:  # a graceful stop: the resumed run sends the flush again
            raise Unwritten(flush, []) from None
        except redis.RedisError as exc:
            msg = f"{what} failed: {type(exc).__name__}: {exc}"
            raise RuntimeError(msg) from exc

    def close(self) -> None:
        if self.client is not None:
            self.client.close()


def redis_datasets(cfg: RedisDestinationConfig, base: Any) -> list[Dataset]:
    """The keys written: namespace ``redis://host:port/db``, name the key template."""
    from urllib.parse import urlsplit

    host, port, db = cfg.host, cfg.port, cfg.db
    if cfg.url is not None:
        parts = urlsplit(cfg.url.get_secret_value())
        host, port = parts.hostname or host, parts.port or port
        db = int(parts.path.lstrip("/") or db)
    return [Dataset(f"redis://{host}:{port}/{db}", cfg.key_template)]


def redis_schema(ctx: SchemaContext[RedisDestinationConfig]) -> FieldType | None:
    """The fields the key template, the field mappings and the value and score read."""
    cfg = ctx.config
    ctx.read_template(("key_template",), cfg.key_template)
    for i, m in enumerate(cfg.fields):
        ctx.read(("fields", i, "source"), m.source)
    ctx.read(("value_field",), cfg.value_field)
    ctx.read(("score_field",), cfg.score_field, want="number")
    return None


@destination(
    "redis",
    config=RedisDestinationConfig,
    datasets=redis_datasets,
    description="Redis keys (hash, string, list, set, sorted_set, stream), pipelined.",
    blocks=("batch",),
    requires=("redis",), extra="redis",
    schema=redis_schema,
)
def build_redis_destination(ctx: BuildContext, up: Stream[list[Any]]) -> Stream[list[Failed]]:
    """The output steps of a ``redis`` destination (scoped under its id)."""
    commands = _Commands(ctx.step_id, ctx.config)
    retry = ctx.workflow.config.retry
    return buffered_output("write", up, commands.prepare, ctx.component.batch,
                           lambda: _RedisWriter(ctx.step_id, ctx.config, retry))

