"""Creates and polls through the pool: reserve -> forward -> record -> answer.

Knows nothing of HTTP handlers: the native and any other API surface call `create` and `poll`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any

from . import logs
from .bodies import SpooledBody
from .breaker import Breakers, Permit
from .clock import Clock
from .config import Config, KeyConfig
from .errors import GatewayError
from .events import Events
from .overload import Admission, Overloaded
from .polls import PollCoalescer
from .pool import KeyPool
from .store import Store, TaskRecord
from .tasks import TaskDirectory
from .upstream import (
    Answer,
    Outcome,
    UpstreamBroken,
    UpstreamClient,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnreachable,
)

log = logging.getLogger("agnes_gateway.service")

FAILOVER_REASONS = {
    Outcome.QUOTA: "quota",
    Outcome.RATE_LIMIT: "rate_limit",
    Outcome.AUTH: "auth",
    Outcome.SERVER_ERROR: "error",
}
# Failures after which a task may exist upstream: the key's unit and the client's stay counted.
UNIT_KEPT = frozenset({"upstream_outcome_unknown", "upstream_bad_answer"})
TASK_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
IDEMPOTENCY_KEY_RE = re.compile(r"^[\x21-\x7e]{1,255}$")
UNKNOWN_TASK_MEMORY = 10_000
#: How often a create waiting for another's Idempotency-Key claim looks again.
IDEMPOTENCY_RECHECK_S = 0.05
#: Upstream answers to a poll worth another try on the same key: the upstream's front end, not the task.
TRANSIENT_STATUSES = frozenset({502, 503, 504})
TERMINAL_STATUSES = frozenset({"completed", "failed"})


@dataclass(frozen=True)
class Created:
    """A task upstream accepted, and the answer to pass on."""

    answer: Answer
    task: TaskRecord
    #: True when this is the task an earlier create with the same `Idempotency-Key` made.
    replayed: bool = False


@dataclass(frozen=True)
class Polled:
    answer: Answer
    task: TaskRecord


class Gateway:
    """The gateway's behaviour, wired to a store, a pool, an upstream and a clock."""

    def __init__(
        self,
        config: Config,
        store: Store,
        pool: KeyPool,
        upstream: UpstreamClient,
        clock: Clock,
        events: Events | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.pool = pool
        self.upstream = upstream
        self.clock = clock
        self.events = events or Events()
        self.tasks = TaskDirectory(store)
        self._unknown: dict[str, float] = {}
        resilience = config.resilience
        self.breakers = Breakers(clock, resilience.breaker_failures, resilience.breaker_open_s)
        limits = config.limits
        self.admission = Admission(limits.max_concurrent_upstream, limits.max_queued, limits.queue_timeout_s)
        #: How retries wait; tests swap in one that moves a `ManualClock` instead of sleeping.
        self.sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
        self._jitter = random.Random()
        self._idempotent: dict[tuple[str, str], tuple[asyncio.Lock, int]] = {}
        self.polls: PollCoalescer[Polled] = PollCoalescer(
            clock, config.poll.freshness_s, keep=lambda polled: polled.answer.outcome is Outcome.OK
        )

    async def create(
        self,
        body: bytes | SpooledBody,
        content_type: str,
        client: str,
        *,
        request_meta: str | None = None,
        idempotency_key: str | None = None,
    ) -> Created:
        """Count the create against the client's daily limit, then make the task on the pool.

        `request_meta` (JSON text) is kept with the task for surfaces that echo what was asked for.
        With an `idempotency_key`, a create the same client already made with it is answered by its task
        (without counting or calling upstream), and concurrent ones with the same key wait for the first:
        upstream sees one create.
        """
        if idempotency_key is None:
            return await self._create(body, content_type, client, request_meta, None)
        if not IDEMPOTENCY_KEY_RE.match(idempotency_key):
            raise GatewayError(400, "invalid_idempotency_key", "Idempotency-Key must be 1-255 visible ASCII characters")
        slot = (client, idempotency_key)
        lock, users = self._idempotent.get(slot) or (asyncio.Lock(), 0)
        self._idempotent[slot] = (lock, users + 1)
        try:
            async with lock:
                earlier = await self._claim(client, idempotency_key)
                if earlier is not None:
                    log.info("create with a known Idempotency-Key: answering task %s again", earlier.task_id)
                    replay = json.dumps({"task_id": earlier.task_id}).encode()
                    return Created(Answer(200, replay, "application/json", Outcome.OK), earlier, replayed=True)
                try:
                    return await self._create(body, content_type, client, request_meta, idempotency_key)
                finally:
                    await self.store.release_idempotency(client, idempotency_key)
        finally:
            lock, users = self._idempotent[slot]
            if users <= 1:
                del self._idempotent[slot]
            else:
                self._idempotent[slot] = (lock, users - 1)

    async def _claim(self, client: str, idempotency_key: str) -> TaskRecord | None:
        """The task an earlier create with this key made; else None, with this process holding the key's claim.

        Within a process the caller's lock orders creates with one key; the claim in the store orders
        them across workers and replicas: a create that finds the key claimed waits (bounded) for the
        other's task, or for the claim to be given up or grow stale (its holder died).
        """
        limit_s = self._create_time_limit()
        for _ in range(math.ceil(limit_s / IDEMPOTENCY_RECHECK_S) + 1):
            earlier = await self.store.find_idempotent(client, idempotency_key)
            if earlier is not None:
                return earlier
            now = self.clock.now().timestamp()
            if await self.store.claim_idempotency(client, idempotency_key, now, now - limit_s):
                return None
            await self.sleep(IDEMPOTENCY_RECHECK_S)
        raise GatewayError(
            409,
            "idempotency_key_in_use",
            "another create with this Idempotency-Key is still under way; retry later",
            retry_after=math.ceil(limit_s),
        )

    def _create_time_limit(self) -> float:
        """The longest one create can take: the queue, a connect timeout per key, one whole call, a margin."""
        upstream, limits = self.config.upstream, self.config.limits
        return limits.queue_timeout_s + upstream.connect_timeout_s * len(self.config.keys) + upstream.timeout_s + 5.0

    async def _create(
        self,
        body: bytes | SpooledBody,
        content_type: str,
        client: str,
        request_meta: str | None,
        idempotency_key: str | None,
    ) -> Created:
        now = self.clock.now()
        # Counts and key marks as every gateway sharing the store left them, not as this one last saw them.
        await self.pool.refresh(now)
        day = self.pool.day
        if await self.store.reserve_client(client, day, self.client_limit(client)) is None:
            retry = max(1, math.ceil(self.pool.schedule.seconds_to_reset(now)))
            raise GatewayError(
                429,
                "client_quota_exceeded",
                f"client {client} has used its daily limit of creates; retry in {retry} s",
                retry_after=retry,
            )
        try:
            return await self._create_on_pool(body, content_type, client, now, request_meta, idempotency_key)
        except GatewayError as exc:
            if exc.code not in UNIT_KEPT:
                await self.store.release_client(client, day)
            raise
        except PassThrough:
            await self.store.release_client(client, day)
            raise

    def client_limit(self, client: str) -> int | None:
        """The client's `daily_limit` in the running config (None: unlimited)."""
        return next((c.daily_limit for c in self.config.clients if c.name == client), None)

    async def _create_on_pool(
        self,
        body: bytes | SpooledBody,
        content_type: str,
        client: str,
        now: datetime,
        request_meta: str | None,
        idempotency_key: str | None,
    ) -> Created:
        """Make a task on the best key, failing over to the next while upstream refuses the key."""
        failure: GatewayError | None = None
        open_circuits: list[str] = []
        for key in self.pool.candidates(now):
            if not self.pool.usable(key, now):
                continue
            try:
                async with self.admission.slot():
                    permit = self.breakers.allow(key.name)
                    if permit is Permit.DENY:
                        open_circuits.append(key.name)
                        continue
                    if not await self.pool.reserve(key):
                        if permit is Permit.PROBE:
                            self.breakers.abandon(key.name)
                        continue
                    answer = await self._call(key, "create", self.upstream.create(key, body, content_type), permit)
            except Overloaded:
                self.events.overloaded()
                raise
            except UpstreamError as exc:
                if not exc.not_sent:
                    # It may have reached upstream and made a task: the unit stays spent, no retry.
                    log.warning("create on key %s: %s; outcome unknown, not retried", key.name, exc)
                    raise GatewayError(
                        504, "upstream_outcome_unknown", f"{exc}; the task may or may not exist"
                    ) from None
                await self.pool.release(key)
                log.warning("create on key %s: %s; trying the next key", key.name, exc)
                self.events.failover("error")
                failure = GatewayError(502, "upstream_unreachable", str(exc))
                continue
            if answer.outcome is Outcome.OK:
                return await self._accepted(key, answer, client, now.timestamp(), request_meta, idempotency_key)
            await self.pool.release(key)
            if answer.outcome in FAILOVER_REASONS:
                self.events.failover(FAILOVER_REASONS[answer.outcome])
            if answer.outcome is Outcome.QUOTA:
                await self.pool.mark_spent(key, now, f"upstream refused for quota (HTTP {answer.status})")
            elif answer.outcome is Outcome.RATE_LIMIT:
                wait = answer.retry_after or self.config.upstream.rate_limit_cooldown_s
                await self.pool.mark_cooling(key, now, wait, f"rate limited by upstream for {wait:g} s")
            elif answer.outcome is Outcome.AUTH:
                await self.pool.mark_disabled(key, f"upstream refused the key (HTTP {answer.status})")
            elif answer.outcome is Outcome.SERVER_ERROR:
                log.warning("create on key %s: upstream answered %d; trying the next key", key.name, answer.status)
                failure = GatewayError(502, "upstream_error", f"upstream answered HTTP {answer.status}")
            else:
                # The request itself was refused: another key would refuse it too.
                raise PassThrough(answer)
        if failure is not None:
            raise failure
        if open_circuits:
            wait = min(self.breakers.retry_after(name) for name in open_circuits)
            raise GatewayError(
                503,
                "upstream_unavailable",
                f"upstream keeps failing for every usable key; retry in {wait} s",
                retry_after=wait,
            )
        retry = self.pool.retry_after(now)
        self.events.exhausted()
        raise GatewayError(
            429,
            "all_keys_exhausted",
            f"every upstream key is spent, cooling down or disabled; retry in {retry} s",
            retry_after=retry,
        )

    async def _accepted(
        self,
        key: KeyConfig,
        answer: Answer,
        client: str,
        now: float,
        request_meta: str | None = None,
        idempotency_key: str | None = None,
    ) -> Created:
        task_id = _task_id(answer.body)
        if task_id is None:
            log.error("create on key %s: upstream accepted but gave no usable task id", key.name)
            raise GatewayError(502, "upstream_bad_answer", "upstream accepted the task but its answer had no task id")
        task = TaskRecord(task_id, key.name, client, now, idempotency_key=idempotency_key, request_meta=request_meta)
        await self.tasks.add(task)
        self.events.task_created(key.name, client)
        return Created(answer, task)

    async def poll(self, task_id: str) -> Polled:
        """Poll a task with the key that made it (finding that key first if the task is new to us)."""
        if not TASK_ID_RE.match(task_id):
            raise GatewayError(400, "invalid_task_id", "task ids are 1-128 letters, digits, '-' or '_'")
        task = await self.tasks.get(task_id)
        if task is None:
            return await self.polls.share(task_id, partial(self._discover, task_id))
        return self.at_hand(task) or await self.poll_known(task)

    def at_hand(self, task: TaskRecord) -> Polled | None:
        """The answer to a poll of `task` when it needs no upstream call: a final one, or a fresh shared one."""
        if task.terminal_body is not None and self.config.poll.terminal_cache:
            # Completed or failed: the answer can no longer change, so upstream is not asked again.
            return Polled(Answer(200, task.terminal_body, "application/json", Outcome.OK), task)
        return self.polls.fresh(task.task_id)

    async def poll_known(self, task: TaskRecord) -> Polled:
        """Poll a task whose route is known, sharing the upstream call with concurrent polls of it."""
        return await self.polls.share(task.task_id, partial(self._poll_known, task))

    async def _poll_known(self, task: TaskRecord) -> Polled:
        """Ask upstream with the key that made the task, and note what it said."""
        task_id = task.task_id
        key = self.pool.key(task.key_name)
        if key is None:
            raise GatewayError(
                410, "task_key_gone", f"the key that made this task ({task.key_name}) is no longer configured"
            )
        answer = await self._poll_with(key, task_id)
        if answer.outcome is Outcome.AUTH:
            await self.pool.mark_disabled(key, f"upstream refused the key on a poll (HTTP {answer.status})")
            raise GatewayError(
                502, "upstream_key_refused", f"upstream refused the key that made this task ({key.name})"
            )
        return Polled(answer, await self._seen(task, answer))

    async def _discover(self, task_id: str) -> Polled:
        """A task the gateway never saw: ask each key; the first that knows it owns it."""
        now = self.clock.monotonic()
        if self._unknown.get(task_id, 0.0) > now:
            raise GatewayError(404, "task_not_found", f"no key knows task {task_id}")
        other: Answer | None = None
        for key in self.pool.poll_keys():
            answer = await self._poll_with(key, task_id)
            if answer.outcome is not Outcome.OK:
                # Only a key that shows the task owns it; a rate limit or a refusal tells nothing.
                if answer.outcome not in (Outcome.NOT_FOUND, Outcome.AUTH):
                    other = answer
                continue
            task = TaskRecord(task_id, key.name, "unknown", self.clock.now().timestamp())
            await self.tasks.add(task)
            log.info("task %s found on key %s", task_id, key.name)
            return Polled(answer, await self._seen(task, answer))
        if other is not None:
            raise PassThrough(other)
        if len(self._unknown) >= UNKNOWN_TASK_MEMORY:
            self._unknown.clear()
        self._unknown[task_id] = now + 60.0
        raise GatewayError(404, "task_not_found", f"no key knows task {task_id}")

    async def _call(
        self, key: KeyConfig, operation: str, call: Awaitable[Answer], permit: Permit = Permit.PASS
    ) -> Answer:
        """Await one upstream call, reporting its outcome and duration, and telling the key's breaker."""
        started = time.perf_counter()
        outcome = "broken"
        status: int | None = None
        told = False
        try:
            answer = await call
            outcome, status = answer.outcome.value, answer.status
            told = True
            if answer.outcome is Outcome.SERVER_ERROR:
                self._failed(key)
            elif self.breakers.success(key.name):
                self.events.circuit(key.name, "closed")
            return answer
        except UpstreamError as exc:
            outcome = (
                "timeout"
                if isinstance(exc, UpstreamTimeout)
                else "unreachable"
                if isinstance(exc, UpstreamUnreachable)
                else "broken"
            )
            told = True
            self._failed(key)
            raise
        finally:
            if not told and permit is Permit.PROBE:
                self.breakers.abandon(key.name)
            seconds = time.perf_counter() - started
            self.events.upstream_call(key.name, operation, outcome, seconds)
            logs.log_upstream_call(logs.UpstreamCall(operation, key.name, outcome, status, seconds * 1000))

    def _failed(self, key: KeyConfig) -> None:
        if self.breakers.failure(key.name):
            self.events.circuit(key.name, "open")

    async def _poll_with(self, key: KeyConfig, task_id: str) -> Answer:
        """One poll on `key`; transient failures are retried on the same key with jittered backoff.

        Polls change nothing upstream, so a retry is safe. It is bounded by `resilience.poll_retries` and
        `resilience.poll_retry_budget_s`; what is still failing then becomes a 502 or 504 JSON error.
        """
        policy = self.config.resilience
        started = self.clock.monotonic()
        attempt = 0
        while True:
            error: UpstreamError | None = None
            answer: Answer | None = None
            try:
                async with self.admission.slot():
                    permit = self.breakers.allow(key.name)
                    if permit is Permit.DENY:
                        wait = self.breakers.retry_after(key.name)
                        raise GatewayError(
                            503,
                            "upstream_unavailable",
                            f"upstream keeps failing for the key of this task ({key.name}); retry in {wait} s",
                            retry_after=wait,
                        )
                    answer = await self._call(key, "poll", self.upstream.poll(key, task_id), permit)
            except Overloaded:
                self.events.overloaded()
                raise
            except UpstreamError as exc:
                error = exc
            transient = (
                isinstance(error, UpstreamUnreachable | UpstreamBroken)
                if error is not None
                else answer is not None and answer.status in TRANSIENT_STATUSES
            )
            if answer is not None and not transient and answer.status < 500:
                return answer
            what = str(error) if error is not None else f"upstream answered HTTP {answer.status if answer else '?'}"
            if transient and attempt < policy.poll_retries:
                delay = self._jitter.uniform(0.0, policy.poll_backoff_s * 2**attempt)
                if self.clock.monotonic() - started + delay <= policy.poll_retry_budget_s:
                    attempt += 1
                    log.info("poll of %s on key %s: %s; retry %d in %.2f s", task_id, key.name, what, attempt, delay)
                    await self.sleep(delay)
                    continue
            log.warning("poll of %s on key %s: %s (after %d attempt(s))", task_id, key.name, what, attempt + 1)
            timed_out = isinstance(error, UpstreamTimeout) or (answer is not None and answer.status == 504)
            if timed_out:
                raise GatewayError(504, "upstream_timeout", what)
            code = "upstream_unreachable" if error is not None else "upstream_error"
            raise GatewayError(502, code, what)

    async def _seen(self, task: TaskRecord, answer: Answer) -> TaskRecord:
        if answer.outcome is not Outcome.OK:
            return task
        doc = _json(answer.body)
        status = doc.get("status") if doc else None
        if not isinstance(status, str):
            return task
        progress = doc.get("progress") if doc else None
        if status in TERMINAL_STATUSES and self.config.poll.terminal_cache:
            return await self.tasks.finished(task, status, answer.body, self.clock.now().timestamp())
        return await self.tasks.seen(
            task, status, progress if isinstance(progress, int) else None, self.clock.now().timestamp()
        )


class PassThrough(Exception):
    """Upstream's own answer, to be given to the client as it is."""

    def __init__(self, answer: Answer) -> None:
        super().__init__(f"upstream answered HTTP {answer.status}")
        self.answer = answer


def _json(body: bytes) -> dict[str, Any] | None:
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def _task_id(body: bytes) -> str | None:
    """The new task's id: `task_id`, or `id` as some versions answer."""
    doc = _json(body) or {}
    for field in ("task_id", "id"):
        value = doc.get(field)
        if isinstance(value, str) and TASK_ID_RE.match(value):
            return value
    return None
