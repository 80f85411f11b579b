"""Lua scripts of ``RedisBus``: every state change of a queue is one script, so it is atomic.

Keys of one queue (see ``redis.queue_keys``), passed in this order to every script that needs them:

    KEYS[1] stream        entries: mid, body, attrs (JSON), sent_at (epoch s), rc (deliveries before
                          this entry was added: kept across release and dead-lettering)
    KEYS[2] leases        sorted set: entry id → lease deadline (ms, server clock)
    KEYS[3] delayed       sorted set: message id → due time (ms, server clock)
    KEYS[4] delayed-msgs  hash: message id → cmsgpack of the entry's fields while delayed
    KEYS[5] dlq stream    the dead-letter queue's stream
    KEYS[6] queues        topology hash: queue name → {"lease_ms", "max_receives"} (0 = no DLQ)

A receipt is ``<entry id>:<PEL delivery count>``. Every (re)delivery is an XREADGROUP or XCLAIM,
which bumps the PEL count, so a receipt names one delivery: ack, extend and release check it and
do nothing for a stale one (the lease expired and the message went to someone else).
"""

from __future__ import annotations

from sdfleet._redis import ADDS_WORK, MOVES_WORK
from sdfleet.bus.base import DLQ_RETENTION_S, QUEUE_RETENTION_S

_COMMON = (
    f"""
local QUEUE_RETENTION_MS, DLQ_RETENTION_MS = {QUEUE_RETENTION_S * 1000}, {DLQ_RETENTION_S * 1000}
"""
    + """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function get(f, k)
  for i = 1, #f, 2 do if f[i] == k then return f[i + 1] end end
  return nil
end
local function put(f, k, v)
  for i = 1, #f, 2 do if f[i] == k then f[i + 1] = v; return end end
  f[#f + 1] = k; f[#f + 1] = v
end
-- Due delayed messages go back to the end of the stream, where KEDA's lag sees them again.
local function promote(stream, delayed, delayed_msgs, now)
  for _, mid in ipairs(redis.call('ZRANGEBYSCORE', delayed, '-inf', now, 'LIMIT', 0, 1000)) do
    local blob = redis.call('HGET', delayed_msgs, mid)
    if blob then redis.call('XADD', stream, '*', unpack(cmsgpack.unpack(blob))) end
    redis.call('HDEL', delayed_msgs, mid)
    redis.call('ZREM', delayed, mid)
  end
end
-- Entries added more than the queue's retention ago go, read or not (SQS's retention). Stream
-- ids are their add time in ms; a spec (decoded) of an earlier version has no retention_ms.
local function retention(spec, default_ms)
  return (spec and spec.retention_ms) or default_ms
end
local function expire(stream, spec, default_ms, now)
  redis.call('XTRIM', stream, 'MINID', string.format('%d', now - retention(spec, default_ms)))
end
-- Retention counts from a message's first send (SQS's rule), not from its last add: an entry
-- given back, delayed or dead-lettered is added again under a new id, so XTRIM alone would keep
-- it longer. Such an entry is checked by its sent_at when it is delivered or given back.
local function outlived(f, spec, default_ms, now)
  local sent = tonumber(get(f, 'sent_at'))
  return sent ~= nil and now - sent * 1000 > retention(spec, default_ms)
end
local function spec_of(queues, name)
  local json = redis.call('HGET', queues, name)
  return json and cjson.decode(json)
end
-- The delivery count of entry id if the receipt's count matches, else nil.
local function current(stream, group, id, pel)
  local p = redis.call('XPENDING', stream, group, id, id, 1)
  if p[1] == nil or tostring(p[1][4]) ~= pel then return nil end
  return tonumber(p[1][4])
end
"""
)

# ARGV: queue, group, consumer, count, lease_ms (-1: the queue's default).
# Returns {-1} for an unknown queue, else {now_ms, next_wake_ms (-1: none), last entry id,
# {{id, fields, receive_count, pel_count}, ...}}.
RECEIVE = (
    MOVES_WORK
    + _COMMON
    + """
local stream, leases, delayed, delayed_msgs, dlq = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local spec = spec_of(KEYS[6], ARGV[1])
if not spec then return {-1} end
local group, consumer, count = ARGV[2], ARGV[3], tonumber(ARGV[4])
local lease = tonumber(ARGV[5])
if lease < 0 then lease = spec.lease_ms end
local now = now_ms()
promote(stream, delayed, delayed_msgs, now)
expire(stream, spec, QUEUE_RETENTION_MS, now)

local out = {}
local function deliver(id, f, pel)
  if outlived(f, spec, QUEUE_RETENTION_MS, now) then
    redis.call('XACK', stream, group, id)
    redis.call('XDEL', stream, id)
    redis.call('ZREM', leases, id)
    return
  end
  local rc = (tonumber(get(f, 'rc')) or 0) + pel
  if spec.max_receives > 0 and rc > spec.max_receives then
    -- SQS redrive: the delivery that would exceed max_receives moves the message instead.
    put(f, 'rc', tostring(rc - 1))
    redis.call('XADD', dlq, '*', unpack(f))
    expire(dlq, spec_of(KEYS[6], ARGV[1] .. '-dlq'), DLQ_RETENTION_MS, now)
    redis.call('XACK', stream, group, id)
    redis.call('XDEL', stream, id)
    redis.call('ZREM', leases, id)
    return
  end
  redis.call('ZADD', leases, now + lease, id)
  out[#out + 1] = {id, f, rc, pel}
end

for _, id in ipairs(redis.call('ZRANGEBYSCORE', leases, '-inf', now, 'LIMIT', 0, count)) do
  local got = redis.call('XCLAIM', stream, group, consumer, 0, id)
  if got[1] == nil or not got[1][2] then
    redis.call('ZREM', leases, id)
  else
    local p = redis.call('XPENDING', stream, group, id, id, 1)
    deliver(id, got[1][2], tonumber(p[1][4]))
  end
end

if #out < count then
  local r = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', count - #out, 'STREAMS', stream, '>')
  if r then
    for _, e in ipairs(r[1][2]) do deliver(e[1], e[2], 1) end
  end
end

local wake = -1
local a = redis.call('ZRANGE', leases, 0, 0, 'WITHSCORES')
if a[2] then wake = tonumber(a[2]) - now end
local b = redis.call('ZRANGE', delayed, 0, 0, 'WITHSCORES')
if b[2] then
  local d = tonumber(b[2]) - now
  if wake < 0 or d < wake then wake = d end
end
local last = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)
local last_id = '0-0'
if last[1] then last_id = last[1][1] end
return {now, wake, last_id, out}
"""
)

# KEYS: the topology hash, then one stream per queue. ARGV: the queues' names (as many as streams),
# then the entry's fields. Adds the entry to every stream, each trimmed to its queue's retention.
PUBLISH = (
    ADDS_WORK
    + _COMMON
    + """
local now = now_ms()
local n = #KEYS - 1
local fields = {}
for i = n + 1, #ARGV do fields[#fields + 1] = ARGV[i] end
for i = 1, n do
  redis.call('XADD', KEYS[i + 1], '*', unpack(fields))
  expire(KEYS[i + 1], spec_of(KEYS[1], ARGV[i]), QUEUE_RETENTION_MS, now)
end
return n
"""
)

# KEYS: stream, leases. ARGV: group, id, pel. Returns 1 if acked, 0 for a stale receipt.
ACK = (
    MOVES_WORK
    + _COMMON
    + """
if not current(KEYS[1], ARGV[1], ARGV[2], ARGV[3]) then return 0 end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
redis.call('ZREM', KEYS[2], ARGV[2])
return 1
"""
)

# KEYS: stream, leases. ARGV: group, id, pel, lease_ms. Returns 1, or 0 for a stale receipt.
EXTEND = (
    MOVES_WORK
    + _COMMON
    + """
if not current(KEYS[1], ARGV[1], ARGV[2], ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[2], now_ms() + tonumber(ARGV[4]), ARGV[2])
return 1
"""
)

# KEYS: stream, leases, delayed, delayed-msgs, the topology hash. ARGV: group, id, pel, delay_ms,
# queue. An entry past its retention is dropped, not given back.
# Returns 1, or 0 for a stale receipt.
RELEASE = (
    MOVES_WORK
    + _COMMON
    + """
local stream, leases, delayed, delayed_msgs = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local group, id = ARGV[1], ARGV[2]
local pel = current(stream, group, id, ARGV[3])
if not pel then return 0 end
local e = redis.call('XRANGE', stream, id, id)
redis.call('XACK', stream, group, id)
redis.call('XDEL', stream, id)
redis.call('ZREM', leases, id)
if e[1] == nil then return 0 end
local f = e[1][2]
if outlived(f, spec_of(KEYS[5], ARGV[5]), QUEUE_RETENTION_MS, now_ms()) then return 1 end
put(f, 'rc', tostring((tonumber(get(f, 'rc')) or 0) + pel))
local delay = tonumber(ARGV[4])
if delay > 0 then
  local mid = get(f, 'mid')
  redis.call('HSET', delayed_msgs, mid, cmsgpack.pack(f))
  redis.call('ZADD', delayed, now_ms() + delay, mid)
else
  redis.call('XADD', stream, '*', unpack(f))
end
return 1
"""
)

# KEYS: the queue's six. ARGV: queue. Promotes due delayed messages too, so a stats poller (the
# API, the metrics exporter) makes them visible to KEDA while no agent runs.
# Returns {-1} for an unknown queue, else {length, in_flight, delayed, oldest sent_at or false,
# dead letters, now_ms}.
STATS = (
    MOVES_WORK
    + _COMMON
    + """
if redis.call('HEXISTS', KEYS[6], ARGV[1]) == 0 then return {-1} end
local now = now_ms()
promote(KEYS[1], KEYS[3], KEYS[4], now)
local length = redis.call('XLEN', KEYS[1])
local in_flight = redis.call('ZCOUNT', KEYS[2], '(' .. now, '+inf')
local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
local oldest = false
if first[1] then oldest = get(first[1][2], 'sent_at') end
return {length, in_flight, redis.call('ZCARD', KEYS[3]), oldest, redis.call('XLEN', KEYS[5]), now}
"""
)
