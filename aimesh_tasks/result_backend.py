"""Celery's Redis result backend, storing a result in one round trip instead of two.

Celery stores a task's result by reading the key first (a result already SUCCESS is never
overwritten: a redelivered copy of a finished task must not replace its answer), then
SET and PUBLISH in a pipeline: two round trips and a decode of whatever was there, for
every message the spine answers. `StoreOnceRedisBackend` makes the same decision inside
Redis, in one script: the same rule, the same key, expiry and publish, so waiters
(`AsyncResult.get`, results.py) see no difference. It is installed for redis:// and
rediss:// result backends through Celery's `override_backends` setting (celery_config.py).

Results compressed by `result_compression` are not JSON that the script can read: with
compression on, Celery's own two-step store is kept.
"""

from __future__ import annotations

from typing import Any

from celery import states
from celery.backends.redis import RedisBackend
from celery.exceptions import BackendStoreError

from aimesh_tasks.redis_batch import registered_script

# KEYS[1] the result key; ARGV[1] the encoded meta, ARGV[2] seconds to keep it (0: no
# expiry). A value already there that decodes to status SUCCESS stays (returns 0).
STORE_ONCE = """
local current = redis.call('GET', KEYS[1])
if current then
  local ok, meta = pcall(cjson.decode, current)
  if ok and type(meta) == 'table' and meta['status'] == 'SUCCESS' then
    return 0
  end
end
if tonumber(ARGV[2]) > 0 then
  redis.call('SETEX', KEYS[1], ARGV[2], ARGV[1])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
"""


class StoreOnceRedisBackend(RedisBackend):  # type: ignore[misc]
    """RedisBackend whose result store is one script (read, decide, set, publish)."""

    def _store_once(self, key: Any, value: Any, expires: int) -> Any:
        # On the client as it is now (Celery makes a new one after a fork).
        return registered_script(self.client, STORE_ONCE)(keys=[key], args=[value, expires])

    def _store_result(self, task_id: Any, result: Any, state: str, traceback: Any = None,
                      request: Any = None, **kwargs: Any) -> Any:
        if self.compression:
            return super()._store_result(task_id, result, state, traceback=traceback,
                                         request=request, **kwargs)
        meta = self._get_result_meta(result=result, state=state, traceback=traceback,
                                     request=request)
        meta["task_id"] = task_id.decode() if isinstance(task_id, bytes) else task_id
        value = self.encode(meta)
        if isinstance(value, str) and len(value) > self._MAX_STR_VALUE_SIZE:
            raise BackendStoreError("value too large for Redis backend", state=state,
                                    task_id=task_id)
        expires = self.failure_expires if state == states.FAILURE else self.expires
        self.ensure(self._store_once, (self.get_key_for_task(task_id), value, int(expires or 0)))
        return result
