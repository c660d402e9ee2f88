"""The Lua scripts behind `RedisLimiter`: each one runs atomically inside Redis.

Keys of one tenant share the hash tag `{tenant}`, so in Redis Cluster they
live on one slot and a script may touch them all. Times are milliseconds;
with no time argument a script reads the Redis server's clock (TIME), so
replicas with skewed clocks still agree.
"""

# KEYS: requests log, token log, token sum, in-flight set
# ARGV: now_ms or "", window_ms, rpm, tpm, concurrent (-1: no limit), cost, ticket,
#       inflight_ttl_ms, concurrent_retry_ms, deadline_ms ("" or 0: none)
# Reply: allowed, reason (1 requests, 2 tokens, 3 concurrent, 4 late), retry_ms, requests, tokens,
#        reset_requests_ms, reset_tokens_ms, now_ms
# A script Redis runs past its deadline (its caller timed out long ago: Redis was stalled, and runs what queued
# once it resumes) takes nothing: the request it was for has ended, maybe without anyone left to end its slot.
ADMIT = """
local req_key, tok_key, sum_key, flight_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local now_ms = tonumber(ARGV[1])
if now_ms == nil then
  local t = redis.call('TIME')
  now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local deadline_ms = tonumber(ARGV[10])
if deadline_ms and deadline_ms > 0 and now_ms > deadline_ms then
  return {0, 4, 0, 0, 0, 0, 0, now_ms}
end
local window_ms, rpm, tpm, conc = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local cost, ticket, flight_ttl_ms, conc_retry_ms = tonumber(ARGV[6]), ARGV[7], tonumber(ARGV[8]), tonumber(ARGV[9])
local cutoff = now_ms - window_ms

local function entry_tokens(member)
  return tonumber(string.match(member, ':(%d+)$'))
end
local function reset_ms(key)
  local newest = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  if newest[2] then return tonumber(newest[2]) + window_ms - now_ms end
  return 0
end

redis.call('ZREMRANGEBYSCORE', req_key, '-inf', cutoff)
local expired = redis.call('ZRANGEBYSCORE', tok_key, '-inf', cutoff)
if #expired > 0 then
  local freed = 0
  for _, member in ipairs(expired) do freed = freed + entry_tokens(member) end
  redis.call('ZREMRANGEBYSCORE', tok_key, '-inf', cutoff)
  redis.call('DECRBY', sum_key, freed)
end
redis.call('ZREMRANGEBYSCORE', flight_key, '-inf', now_ms)

local requests = redis.call('ZCARD', req_key)
local tokens = tonumber(redis.call('GET', sum_key) or '0')
local flight = redis.call('ZCARD', flight_key)

local reason, retry_ms = 0, 0
local function refuse(code, wait_ms)
  if reason == 0 then reason = code end
  if wait_ms > retry_ms then retry_ms = wait_ms end
end
if rpm >= 0 and requests + 1 > rpm then
  local index = requests - rpm
  local oldest = redis.call('ZRANGE', req_key, index, index, 'WITHSCORES')
  if rpm > 0 and oldest[2] then refuse(1, tonumber(oldest[2]) + window_ms - now_ms)
  else refuse(1, window_ms) end
end
if tpm >= 0 and tokens + cost > tpm then
  local wait_ms = window_ms
  if cost <= tpm then
    local need, freed, offset, found = tokens + cost - tpm, 0, 0, false
    repeat    -- oldest first, a page at a time: usually the first page is enough
      local page = redis.call('ZRANGE', tok_key, offset, offset + 127, 'WITHSCORES')
      for i = 1, #page, 2 do
        freed = freed + entry_tokens(page[i])
        if freed >= need then
          wait_ms, found = tonumber(page[i + 1]) + window_ms - now_ms, true
          break
        end
      end
      offset = offset + 128
    until found or #page < 256
  end
  refuse(2, wait_ms)
end
if conc >= 0 and flight + 1 > conc then refuse(3, conc_retry_ms) end

if reason == 0 then
  local key_ttl_ms = window_ms + 1000
  if rpm >= 0 then
    redis.call('ZADD', req_key, now_ms, ticket)
    redis.call('PEXPIRE', req_key, key_ttl_ms)
    requests = requests + 1
  end
  if tpm >= 0 then
    redis.call('ZADD', tok_key, now_ms, ticket .. ':' .. cost)
    tokens = redis.call('INCRBY', sum_key, cost)
    redis.call('PEXPIRE', tok_key, key_ttl_ms)
    redis.call('PEXPIRE', sum_key, key_ttl_ms)
  end
  if conc >= 0 then
    redis.call('ZADD', flight_key, now_ms + flight_ttl_ms, ticket)
    redis.call('PEXPIRE', flight_key, flight_ttl_ms + 1000)
  end
end
return {reason == 0 and 1 or 0, reason, math.ceil(retry_ms), requests, tokens,
        reset_ms(req_key), reset_ms(tok_key), now_ms}
"""

# KEYS: token log, token sum, then the sets the ticket leaves as well: the in-flight set when its slot is
#       released, and the requests log when the admission is withdrawn (its request was refused after all)
# ARGV: now_ms or "", window_ms, ticket, reserved tokens, actual tokens
# Reply: the change applied to the token sum
SETTLE = """
local tok_key, sum_key = KEYS[1], KEYS[2]
for i = 3, #KEYS do redis.call('ZREM', KEYS[i], ARGV[3]) end
local now_ms = tonumber(ARGV[1])
if now_ms == nil then
  local t = redis.call('TIME')
  now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local window_ms, ticket = tonumber(ARGV[2]), ARGV[3]
local reserved, actual = tonumber(ARGV[4]), tonumber(ARGV[5])
local member = ticket .. ':' .. reserved
local score = redis.call('ZSCORE', tok_key, member)
local delta = actual - reserved
if score and tonumber(score) > now_ms - window_ms then
  redis.call('ZREM', tok_key, member)
  redis.call('ZADD', tok_key, score, ticket .. ':' .. actual)
else
  -- the reservation left the window: only an excess is charged, as a new entry at now
  local correction = ticket .. '+' .. now_ms .. ':' .. delta
  if delta <= 0 or redis.call('ZADD', tok_key, 'NX', now_ms, correction) == 0 then return 0 end
end
redis.call('INCRBY', sum_key, delta)
redis.call('PEXPIRE', tok_key, window_ms + 1000)
redis.call('PEXPIRE', sum_key, window_ms + 1000)
return delta
"""

# KEYS: requests log, token log, in-flight set
# ARGV: now_ms or "", window_ms
# Reply: requests, tokens, in flight, all within the window (read only)
USAGE = """
local req_key, tok_key, flight_key = KEYS[1], KEYS[2], KEYS[3]
local now_ms = tonumber(ARGV[1])
if now_ms == nil then
  local t = redis.call('TIME')
  now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local cutoff = '(' .. (now_ms - tonumber(ARGV[2]))
local tokens = 0
for _, member in ipairs(redis.call('ZRANGEBYSCORE', tok_key, cutoff, '+inf')) do
  tokens = tokens + tonumber(string.match(member, ':(%d+)$'))
end
return {redis.call('ZCOUNT', req_key, cutoff, '+inf'), tokens,
        redis.call('ZCOUNT', flight_key, '(' .. now_ms, '+inf')}
"""
