"""kombu's Redis transport, with a guard on the decoding of what it pops off a queue.

Works around celery/celery#4308 ("Worker dies if unable to decode a message") and
celery/kombu#2421 (a consumer crashes with JSONDecodeError on a non-Celery message), both
open: kombu's `Channel._brpop_read` runs `loads()` on the popped bytes, and the virtual
`Message` indexes the result, in the consumer's main loop with no error handling, so 17
bytes of invalid JSON on `aimesh.route` stop the worker ("Unrecoverable error:
JSONDecodeError"). Here an item that is not JSON, or not a message envelope
(`delivery.envelope`), goes to the dead-letter store instead and the loop goes on; it was
already popped, so there is nothing to ack. Installed by `aimesh_tasks.delivery.install`
(the `broker_transport` setting, for redis:// and rediss:// broker URLs).

Two windows of this transport are covered, not closed:
- BRPOP takes a message off its queue one round trip before `QoS.append` records it in
  the `unacked` hash; a worker main process killed in between loses it (MEASURED.md
  finding 12). Closing that needs an atomic move (BLMOVE into a per-consumer list) and a
  sweeper for the lists of dead consumers; instead the accepted-messages record and its
  reconciler (`delivery/accepted.py`, `delivery/reconciler.py`) publish such a message
  again, which is safe because a duplicate of a message is the same message.
- On a lost connection kombu gives the unacked messages of the closing channel back to
  their queues at once, but the broker is usually the thing that went away, so that fails
  and they wait in the `unacked` hash for the visibility timeout; worse, kombu may rebuild
  the closing channel's pool from a connection already closed, and the AttributeError
  ("'NoneType' object has no attribute 'hostname'") stops the worker (MEASURED.md finding
  13). `GuardedQoS` keeps their delivery tags instead, and the next channel (once the
  worker has reconnected) restores them: the worker lives on, and work that could not be
  acked is not stuck for the visibility timeout. Acks whose removal had not been sent yet
  (they are batched, see below) are removed by the next channel too. A task still running
  through the loss acks, when it ends, on the closed channel, where kombu fails the same
  way; that ack is dropped (its message is back on its queue already: the copy runs
  again, and a duplicate of a message is the same message).
"""

from __future__ import annotations

import logging
import threading
import time
from queue import Empty
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.transport.virtual import Message
from kombu.utils.json import dumps

from aimesh_tasks.delivery import dead_letters
from aimesh_tasks.delivery.envelope import (
    NOT_AN_ENVELOPE,
    BadEnvelope,
    check_envelope,
    decode_envelope,
)
from aimesh_tasks.redis_batch import registered_script

logger = logging.getLogger(__name__)
# Delivery tags whose restore failed with the connection; the next channel restores them.
_unrestored: set[str] = set()
# Delivery tags acked whose records a lost connection kept; the next channel removes them.
_unforgotten: set[str] = set()


class GuardedMessage(Message):
    """A virtual-transport message that refuses an envelope the consumer would trip on."""

    def __init__(self, payload: Any, channel: Any = None, **kwargs: Any) -> None:
        check_envelope(payload)
        try:
            super().__init__(payload, channel=channel, **kwargs)  # type: ignore[no-untyped-call]
        except Exception as exc:  # the body does not decode (bad base64, unknown encoding)
            raise BadEnvelope(NOT_AN_ENVELOPE, f"body: {type(exc).__name__}: {exc}") from exc


def bury(queue: str, raw: bytes, error: BadEnvelope) -> None:
    """Dead-letter an item popped off `queue`; if even that fails, log it (it is gone)."""
    try:
        dead_letters.add(queue, raw, error.reason, error.detail)
    except Exception:
        logger.exception("dead_letter.store_failed", extra={
            "queue": queue, "reason": error.reason, "bytes": len(raw)})


# kombu records a delivered message (ZADD to the unacked index, HSET of the message) and
# forgets an acked one (ZREM, HDEL) in a MULTI/EXEC pipeline each: four commands and four
# replies for redis-py to pack and parse, ~7 % of a worker's CPU each at 0 ms provider
# latency (py-spy, issue 18). The same two writes in one script are one command, and as
# atomic: no reader ever sees the index entry without the message or the other way round.
# An ack is not sent on its own either: the tags acked since the last script ride the
# next delivery's record (ARGV[4...]), or, with no delivery, go before the next BRPOP
# once ACK_FLUSH_S old (kombu's BRPOP returns within a second when idle). A forget sent
# late only keeps an acked message's record that much longer; should the worker die
# first, the record is restored after the visibility timeout and the message runs again,
# which on the message path is the same message (its lease and journal).
_RECORD_UNACKED = """
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
if #ARGV > 3 then
  redis.call('ZREM', KEYS[1], unpack(ARGV, 4))
  redis.call('HDEL', KEYS[2], unpack(ARGV, 4))
end
return 1
"""
_FORGET_UNACKED = """
redis.call('ZREM', KEYS[1], unpack(ARGV))
redis.call('HDEL', KEYS[2], unpack(ARGV))
return 1
"""
ACK_FLUSH_S = 0.2
_MAX_TAGS = 500  # per script call (Lua's unpack takes a few thousand at most)


class GuardedQoS(kombu_redis.QoS):
    """kombu's Redis QoS, keeping what it could not restore for the next channel and
    dropping acks on a channel closed with its connection; the unacked records written and
    removed by one script each, the removals of acked messages batched (see above)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self._acked: list[str] = []  # acked here, their records not yet removed in Redis
        self._acked_since = 0.0
        self._acked_lock = threading.Lock()

    def _script(self, source: str) -> Any:
        """`source` on the channel's client; None where the client prefixes keys (kombu's
        prefixing client prefixes only an EVALSHA's first key): kombu's own pipeline then."""
        if self.channel.global_keyprefix:
            return None
        return registered_script(self.channel._create_client(), source)

    def append(self, message: Any, delivery_tag: str) -> None:
        script = self._script(_RECORD_UNACKED)
        if script is None:
            super().append(message, delivery_tag)  # type: ignore[no-untyped-call]
            return
        delivery = message.delivery_info
        record = dumps([message._raw, delivery["exchange"],  # type: ignore[no-untyped-call]
                        delivery["routing_key"]])
        acked = self._take_acked(0.0)
        try:
            script(keys=[self.unacked_index_key, self.unacked_key],
                   args=[repr(time.time()), delivery_tag, record, *acked])
        except Exception:
            self._give_back(acked)
            raise
        virtual.QoS.append(self, message, delivery_tag)  # type: ignore[no-untyped-call]

    def _forget(self, delivery_tag: str) -> None:
        script = self._script(_FORGET_UNACKED)
        if script is None:
            self._remove_from_indices(delivery_tag).execute()  # type: ignore[no-untyped-call]
        else:
            script(keys=[self.unacked_index_key, self.unacked_key], args=[delivery_tag])

    def ack(self, delivery_tag: str) -> None:
        if self.channel.connection is None:
            self._dropped(delivery_tag)
            return
        if self.channel.global_keyprefix:
            self._forget(delivery_tag)
        else:
            with self._acked_lock:
                if not self._acked:
                    self._acked_since = time.monotonic()
                self._acked.append(delivery_tag)
        virtual.QoS.ack(self, delivery_tag)  # type: ignore[no-untyped-call]

    def _take_acked(self, older_than_s: float) -> list[str]:
        """The acked tags not yet forgotten (at most _MAX_TAGS, oldest first), once the
        oldest is `older_than_s` old; [] before."""
        with self._acked_lock:
            if not self._acked or time.monotonic() - self._acked_since < older_than_s:
                return []
            taken, self._acked = self._acked[:_MAX_TAGS], self._acked[_MAX_TAGS:]
            return taken

    def _give_back(self, tags: list[str]) -> None:
        """Tags whose removal failed: sent again with the next script."""
        if tags:
            with self._acked_lock:
                self._acked[:0] = tags

    def flush_acked(self, older_than_s: float = 0.0) -> None:
        """Remove the records of the messages acked here (those waiting `older_than_s` or
        more); on an error they wait for the next script, and the error is raised."""
        while acked := self._take_acked(older_than_s):
            try:
                self._script(_FORGET_UNACKED)(keys=[self.unacked_index_key, self.unacked_key],
                                              args=acked)
            except Exception:
                self._give_back(acked)
                raise

    def flush_or_hand_on(self) -> None:
        """Remove the records of everything acked here; when Redis cannot be reached, leave
        them to the next channel (the worker's, once it has reconnected)."""
        try:
            self.flush_acked()
        except Exception:
            with self._acked_lock:
                _unforgotten.update(self._acked)
                self._acked = []
            logger.warning("delivery.acks_handed_on", extra={"messages": len(_unforgotten)})

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        if self.channel.connection is None:
            self._dropped(delivery_tag)
        elif requeue:
            super().reject(delivery_tag, requeue=True)  # type: ignore[no-untyped-call]
        else:
            self._forget(delivery_tag)
            virtual.QoS.ack(self, delivery_tag)  # type: ignore[no-untyped-call]

    def _dropped(self, delivery_tag: str) -> None:
        logger.info("delivery.ack_after_close", extra={"delivery_tag": delivery_tag})
        virtual.QoS.ack(self, delivery_tag)  # type: ignore[no-untyped-call]

    def restore_unacked(self, client: Any = None) -> None:
        # Acked tags leave the delivered set first (kombu's own restore_unacked_once does
        # so, a direct call does not): with their records' removal batched, an acked
        # message's record may still be in Redis, and would be given back to its queue.
        self._flush()  # type: ignore[no-untyped-call]
        self.flush_or_hand_on()  # the channel closes: what it acked is not given back
        try:
            super().restore_unacked(client)  # type: ignore[no-untyped-call]
        except Exception as exc:  # whatever stopped this channel; see the module docstring
            _unrestored.update(str(tag) for tag in self._delivered)
            self._delivered.clear()
            logger.warning("delivery.restore_deferred", extra={
                "messages": len(_unrestored), "error": type(exc).__name__})


class GuardedChannel(kombu_redis.Channel):
    """A Redis channel whose consumer survives any bytes on its queues."""

    Message = GuardedMessage
    QoS = GuardedQoS
    _sync_client: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        # kombu builds a new redis.Redis for every ack, reject and put (conn_or_acquire),
        # and redis-py's Redis.__init__ copies its whole response-callback table: ~10 % of
        # a worker's CPU at 0 ms provider latency (py-spy, issue 18). A Redis client is
        # thread-safe (each command or pipeline takes its own pooled connection), so one
        # per channel and pool serves them all; after a fork or a reconnect the pool is new,
        # and so is the client.
        if asynchronous:
            return super()._create_client(asynchronous=True)  # type: ignore[no-untyped-call]
        client = self._sync_client
        if client is None or client.connection_pool is not self.pool:
            client = self._sync_client = super()._create_client()  # type: ignore[no-untyped-call]
        return client

    def close(self) -> None:
        qos = getattr(self, "_qos", None)
        if qos is not None and not self.closed:
            qos.flush_or_hand_on()  # before kombu drops the pools
        super().close()  # type: ignore[no-untyped-call]

    def _brpop_start(self, timeout: Any = None) -> Any:
        try:
            self.qos.flush_acked(ACK_FLUSH_S)
        except Exception:  # Redis is away: the BRPOP meets it too, and kombu reconnects
            logger.debug("delivery.acks_not_flushed", exc_info=True)
        return super()._brpop_start(timeout)  # type: ignore[no-untyped-call]

    def basic_consume(self, queue: str, *args: Any, **kwargs: Any) -> Any:
        consumer_tag = super().basic_consume(queue, *args, **kwargs)  # type: ignore[no-untyped-call]
        restore_deferred(self.qos)
        if _unforgotten:
            tags = list(_unforgotten)
            _unforgotten.difference_update(tags)
            self.qos._give_back(tags)  # removed with this channel's next script
        return consumer_tag

    def _brpop_read(self, **options: Any) -> bool:
        # kombu 5.7's Channel._brpop_read, except for the guarded decode and delivery.
        try:
            try:
                dest__item = self.client.parse_response(self.client.connection, "BRPOP",
                                                        **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            if not dest__item:
                raise Empty()
            dest, item = dest__item
            name = dest.decode() if isinstance(dest, bytes) else str(dest)
            dest = name.rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            try:
                self.connection._deliver(decode_envelope(item), dest)
            except BadEnvelope as exc:
                bury(dest, item if isinstance(item, bytes) else str(item).encode(), exc)
            return True
        finally:
            self._in_poll = None  # type: ignore[assignment]
            flush_reauth = getattr(self, "_flush_brpop_reauth", None)  # kombu >= 5.7
            if flush_reauth is not None:
                flush_reauth()


def restore_deferred(qos: kombu_redis.QoS) -> int:
    """Give the messages a closed channel could not restore back to their queues (each is
    moved out of the `unacked` hash in one transaction: none twice); how many tags."""
    done = 0
    while _unrestored:
        tag = next(iter(_unrestored))
        # A connection error here leaves the rest for the next channel.
        qos.restore_by_tag(tag)  # type: ignore[no-untyped-call]
        _unrestored.discard(tag)
        done += 1
    if done:
        logger.info("delivery.restored_after_reconnect", extra={"messages": done})
    return done


class GuardedTransport(kombu_redis.Transport):
    """kombu's Redis transport with GuardedChannel."""

    Channel = GuardedChannel
