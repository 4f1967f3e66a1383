"""Read-ahead messages, taken in one step and recorded per pool process (tasks/prefetch.py).

kombu's ``basic_get`` on Redis pops a message (RPOP), then records it unacked (the ``unacked``
hash and ``unacked_index`` sorted set) in a second round trip: a pool process killed between the
two (the OOM killer) lost the message, and its job never ended. Here one Lua script pops the
message, records it in kombu's unacked structures exactly as ``QoS.append`` does, and adds its
delivery tag to the taking process's own set, ``clipbatch:readahead:<node>:<pid>``. Killed at any
instant, the process either never took the message (it is still queued) or holds it recorded:
the worker's main process hands a lost process's set back to the queue at once (``ShardRequest``),
and if the whole worker dies the visibility timeout restores it from the unacked hash. A set per
process, keyed by node and pid, holds any pool size without two processes sharing a record.
"""
from __future__ import annotations

import hashlib
import time
from typing import Any

from kombu.transport.redis import QoS as RedisQoS
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads
from redis.exceptions import NoScriptError

from clipbatch.core import keys

# KEYS: the queue's priority lists (in the order kombu pops them), kombu's unacked hash and
# index, the taking process's set. ARGV: now, the set's TTL. Returns the raw message, or false. A
# message that is not kombu's JSON goes back where it was (Celery's consumer deals with it).
_TAKE = """
local lists = #KEYS - 3
for i = 1, lists do
  local item = redis.call('RPOP', KEYS[i])
  if item then
    local ok, message = pcall(cjson.decode, item)
    local props = ok and type(message) == 'table' and message['properties']
    local info = props and props['delivery_info']
    local tag = props and props['delivery_tag']
    if type(info) ~= 'table' or type(tag) ~= 'string' then
      redis.call('RPUSH', KEYS[i], item)
      return false
    end
    redis.call('HSET', KEYS[lists + 1], tag,
      '[' .. item .. ',' .. cjson.encode(info['exchange'] or '') .. ',' .. cjson.encode(info['routing_key'] or '') .. ']')
    redis.call('ZADD', KEYS[lists + 2], ARGV[1], tag)
    redis.call('SADD', KEYS[lists + 3], tag)
    redis.call('EXPIRE', KEYS[lists + 3], ARGV[2])
    return item
  end
end
return false
"""
_TAKE_SHA = hashlib.sha1(_TAKE.encode()).hexdigest()


def held_key(node: str, pid: int) -> str:
    """Set: the delivery tags of the read-ahead messages pool process ``pid`` of worker ``node`` holds."""
    return keys.prefetch_held(node, pid)


def take(channel: Any, queue: str, held: str, ttl_s: int, accept: Any) -> Any:
    """The next message of ``queue`` as kombu's ``basic_get`` gives it unacked (None when empty),
    popped and recorded in one step: unacked in kombu's structures, held in set ``held``."""
    lists = [channel._q_for_pri(queue, pri) for pri in channel.priority_steps]
    names = [*lists, channel.unacked_key, channel.unacked_index_key, held]
    with channel.conn_or_acquire() as client:
        try:
            raw = client.evalsha(_TAKE_SHA, len(names), *names, time.time(), ttl_s)
        except NoScriptError:  # the first take since Redis started: EVAL loads it
            raw = client.eval(_TAKE, len(names), *names, time.time(), ttl_s)
    if raw is None:
        return None
    message = channel.Message(loads(bytes_to_str(raw)), channel=channel)
    # kombu's own bookkeeping of a delivered message; the Redis side was written by the script
    super(RedisQoS, channel.qos).append(message, message.delivery_tag)
    message.accept = accept
    return message


def release(client: Any, held: str, tag: str) -> None:
    """``tag`` is no longer held (acked, or put back)."""
    client.srem(held, tag)


def held_by(client: Any, held: str) -> list[str]:
    """The tags set ``held`` names, and the set gone (its process was lost)."""
    pipe = client.pipeline()
    pipe.smembers(held)
    pipe.delete(held)
    tags, _ = pipe.execute()
    return sorted(t.decode() if isinstance(t, bytes) else t for t in tags)

