"""The Lua scripts behind `RedisBudgets`' reservations: each one runs atomically inside Redis.

A tenant's holds (the predicted cost each request in flight reserved) are a
sorted set of `ticket:nanos` members scored by when they expire, beside their
sum. Both keys share the tenant's `{tenant}` hash tag with its day and month
totals, so in Redis Cluster one script may touch them all. Expiry reads the
Redis server's clock (TIME), so replicas with skewed clocks agree; a hold
whose replica died leaves the sum when the next reservation of the tenant
finds it expired, like a concurrency slot in `limits_lua.ADMIT`.

A replica's charges, and the holds they give back, reach Redis as numbered
flush parts (FLUSH): each is applied only if this replica's applied-flush
marker is below its number, and the marker then holds the highest number
applied. So a part sent again (its first call unanswered: lost, or applied
with its reply lost) is never applied twice, and a call carries the parts
before its own that may not be applied yet, so the marker never passes a part
that could still land.
"""

#: Lua the scripts reading the holds begin with (each is sent whole): a hold member's cost, and what one given
#: back frees
HOLDS = """
local function hold_cost(member) return tonumber(string.match(member, ':(%d+)$')) end
-- a hold given back frees its cost while the set has it unexpired; one Redis never took (its reservation
-- unanswered, never run), or one expired and already out of the sum, frees nothing
local function freed_by(holds_key, member, now_ms)
  local expires_ms = redis.call('ZSCORE', holds_key, member)
  if expires_ms and tonumber(expires_ms) > now_ms then return hold_cost(member) end
  return 0
end
"""

# KEYS: day total, month total, this replica's applied-flush marker, holds (sorted set), holds' sum
# ARGV: day limit, month limit (nano-USD; -1: none), cost (nano-USD), member (ticket:cost), hold_ttl_ms,
#       n, then per charge flush of this replica not yet known applied: seq, day nanos, month nanos, k, then the k
#       members (ticket:cost) of the holds it gives back; then the deadline (ms on Redis's clock; 0: none)
# Reply: reserved (1 or 0), day spent, month spent, held by the others (all nano-USD, this replica's flushes
#        counted as the marker says), Redis's clock (ms), late (1: run past its deadline, nothing held or read)
RESERVE = HOLDS + """
local day_key, month_key, applied_key, holds_key, sum_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local day_limit, month_limit, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local member, ttl_ms, flushes = ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
-- run by a Redis resuming from a stall after its caller gave up (and maybe gave the hold back): hold nothing
local last = 7
for _ = 1, flushes do last = last + 4 + tonumber(ARGV[last + 3]) end
local deadline_ms = tonumber(ARGV[last] or '0')
if deadline_ms > 0 and now_ms > deadline_ms then return {0, 0, 0, 0, now_ms, 1} end

local expired = redis.call('ZRANGEBYSCORE', holds_key, '-inf', now_ms)
if #expired > 0 then
  local freed = 0
  for _, m in ipairs(expired) do freed = freed + hold_cost(m) end
  redis.call('ZREMRANGEBYSCORE', holds_key, '-inf', now_ms)
  if redis.call('ZCARD', holds_key) == 0 then redis.call('DEL', sum_key)
  else redis.call('DECRBY', sum_key, freed) end
end

local day = tonumber(redis.call('GET', day_key) or '0')
local month = tonumber(redis.call('GET', month_key) or '0')
local applied = tonumber(redis.call('GET', applied_key) or '0')
local held = tonumber(redis.call('GET', sum_key) or '0')
local at = 7
for _ = 1, flushes do
  local released = tonumber(ARGV[at + 3])
  if tonumber(ARGV[at]) > applied then
    day = day + tonumber(ARGV[at + 1])
    month = month + tonumber(ARGV[at + 2])
    for i = at + 4, at + 3 + released do held = held - freed_by(holds_key, ARGV[i], now_ms) end
  end
  at = at + 4 + released
end
if held < 0 then held = 0 end

local function over(limit, spent)
  return limit >= 0 and (spent >= limit or spent + held + cost > limit)
end
local reserved = 0
if not over(day_limit, day) and not over(month_limit, month) then
  reserved = 1
  -- NX: a reservation run twice (a client that sent it again) holds its cost once
  if redis.call('ZADD', holds_key, 'NX', now_ms + ttl_ms, member) == 1 then redis.call('INCRBY', sum_key, cost) end
  redis.call('PEXPIRE', holds_key, ttl_ms + 1000)
  redis.call('PEXPIRE', sum_key, ttl_ms + 1000)
end
return {reserved, day, month, held, now_ms, 0}
"""

# KEYS: this replica's applied-flush marker, holds (sorted set), holds' sum, then the day and month totals the
#       parts add to
# ARGV: the marker's TTL (s), n, then per part, oldest first: seq, t, m, then t times (the total's index in KEYS,
#       nano-USD to add, the total's TTL in s), then the m members (ticket:cost) of the holds it gives back (one
#       not held, given back already or expired, is skipped)
# Reply: the marker before, the marker after (a part numbered up to it is in the store)
FLUSH = HOLDS + """
local applied_key, holds_key, sum_key = KEYS[1], KEYS[2], KEYS[3]
local applied = tonumber(redis.call('GET', applied_key) or '0')
local top, at, apply = applied, 3, {}
for _ = 1, tonumber(ARGV[2]) do             -- first which parts apply, reading only
  local seq, totals, members = tonumber(ARGV[at]), tonumber(ARGV[at + 1]), tonumber(ARGV[at + 2])
  if seq > top then
    apply[#apply + 1] = at
    top = seq
  end
  at = at + 3 + totals * 3 + members
end
-- the marker moves before any total does: should a write below fail (a total someone made no integer), the
-- parts are at worst half applied, never applied again by the call sent after this one went unanswered
if top > applied then redis.call('SET', applied_key, top, 'EX', ARGV[1]) end
local freed = 0
for _, start in ipairs(apply) do
  local totals, members = tonumber(ARGV[start + 1]), tonumber(ARGV[start + 2])
  at = start + 3
  for i = at, at + (totals - 1) * 3, 3 do
    local key = KEYS[tonumber(ARGV[i])]
    redis.call('INCRBY', key, ARGV[i + 1])
    redis.call('EXPIRE', key, ARGV[i + 2])
  end
  for i = at + totals * 3, at + totals * 3 + members - 1 do
    local m = ARGV[i]
    if redis.call('ZREM', holds_key, m) == 1 then freed = freed + hold_cost(m) end
  end
end
if freed > 0 then
  if redis.call('ZCARD', holds_key) == 0 then redis.call('DEL', sum_key)
  else redis.call('DECRBY', sum_key, freed) end
end
return {applied, top}
"""

# KEYS: day total, month total, this replica's applied-flush marker, holds (sorted set), holds' sum
# ARGV: n, then per charge flush of this replica not yet landed: seq, k, then the k members (ticket:cost) of the
#       holds it gives back; read only (expired holds are left for the next reservation to drop)
# Reply: day spent, month spent, the marker, held by unexpired holds, less those this replica's flushes not yet
#        applied give back (all nano-USD)
USAGE = HOLDS + """
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local held = tonumber(redis.call('GET', KEYS[5]) or '0')
for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now_ms)) do
  held = held - hold_cost(m)
end
local applied = tonumber(redis.call('GET', KEYS[3]) or '0')
local at = 2
for _ = 1, tonumber(ARGV[1] or '0') do
  local released = tonumber(ARGV[at + 1])
  if tonumber(ARGV[at]) > applied then
    for i = at + 2, at + 1 + released do held = held - freed_by(KEYS[4], ARGV[i], now_ms) end
  end
  at = at + 2 + released
end
return {tonumber(redis.call('GET', KEYS[1]) or '0'), tonumber(redis.call('GET', KEYS[2]) or '0'),
        applied, math.max(held, 0)}
"""
