-- admit.lua: evaluate every check of an AdmitPlan, then apply all of them or none.
-- Same semantics as LocalLimits.admit in gateway/ratelimit.py (the conformance suite runs both).
-- All keys share one {hash tag}, so the script touches one Redis Cluster slot.
--
-- KEYS[1]    hold marker (tells settle that this reservation landed)
-- KEYS[1+i]  key of check i
-- ARGV[1] request id (lease member)   ARGV[2] hold ttl ms   ARGV[3] number of checks
-- then 6 values per check: type, p1, p2, p3, p4, shadow (0/1)
--   type 1 GCRA     p1 P            p2 burst   p3 cost              p4 Q   (interval P/Q ms)
--   type 2 LEASE    p1 max          p2 ttl_ms
--   type 3 COUNTER  p1 limit        p2 cost    p3 ttl_ms  p4 reset_ms
--   type 4 REPEAT   p1 max          p2 window_ms
--   type 5 COUNTER with an idle TTL (an agent run's budget): as 3, and every admission
--                   renews the key's TTL to p3
--   type 6 SINCE    p1 max_ms       p2 ttl_ms (an agent run's age: the first admission's
--                   time, in ms, is kept; refused once now - first > max_ms)
-- Returns {allowed 0/1, failed check (0-based) or -1, then per check: ok, retry_after_ms,
--          remaining, reset_ms, then the 0-based indexes of failed shadow checks}
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)  -- GCRA: whole ms

-- GCRA in integers: gcra_ahead / gcra_state, shared with settle.lua.
-- include gcra.lua
local function ceil_div(a, b) return -math.floor(-a / b) end
local member = ARGV[1]
local n = tonumber(ARGV[3])
local allowed, failed = 1, -1
local results, writes, shadow_failed = {}, {}, {}

for i = 1, n do
  local b = 3 + (i - 1) * 6
  local kind = tonumber(ARGV[b + 1])
  local p1, p2 = tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
  local p3, p4 = tonumber(ARGV[b + 4]), tonumber(ARGV[b + 5])
  local shadow = ARGV[b + 6] == '1'
  local key = KEYS[i + 1]
  local ok, retry, remaining, reset = 1, 0, 0, 0
  local write = nil
  if kind == 1 then
    local ahead = gcra_ahead(redis.call('GET', key), p4)
    local need, cap = ahead + p3 * p1, p2 * p1
    if need > cap then
      ok, retry, reset = 0, ceil_div(need - cap, p4), ceil_div(ahead, p4)
    else
      remaining, reset = math.floor((cap - need) / p1), ceil_div(need, p4)
      write = {1, key, gcra_state(need, p4), math.max(1, reset)}
    end
  elseif kind == 2 then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    local count = redis.call('ZCARD', key)
    if redis.call('ZSCORE', key, member) then count = count - 1 end
    if count >= p1 then
      local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
      ok, retry = 0, math.max(1, math.ceil(tonumber(first[2]) - now))
    else
      remaining = p1 - count - 1
      write = {2, key, now + p2, p2}
    end
  elseif kind == 3 or kind == 5 then
    local used = tonumber(redis.call('GET', key) or '0')
    if used + p2 > p1 then
      ok, retry, remaining, reset = 0, p4, p1 - used, p4
    else
      remaining, reset = p1 - used - p2, p4
      write = {kind, key, p2, p3}
    end
  elseif kind == 6 then
    local first = tonumber(redis.call('GET', key) or now_ms)
    local left = p1 - (now_ms - first)
    if left < 0 then
      ok = 0
    else
      remaining = left
      write = {6, key, first, p2}
    end
  else
    local count = tonumber(redis.call('GET', key) or '0')
    if count >= p1 then
      ok, retry = 0, math.max(1, redis.call('PTTL', key))
    else
      remaining = p1 - count - 1
      write = {4, key, p2}
    end
  end
  table.insert(results, ok)
  table.insert(results, retry)
  table.insert(results, remaining)
  table.insert(results, reset)
  if ok == 1 then
    table.insert(writes, write)
  elseif shadow then
    table.insert(shadow_failed, i - 1)
  elseif allowed == 1 then
    allowed, failed = 0, i - 1
  end
end

if allowed == 1 then
  for _, w in ipairs(writes) do
    if w[1] == 1 then
      redis.call('SET', w[2], w[3], 'PX', w[4])
    elseif w[1] == 2 then
      redis.call('ZADD', w[2], w[3], member)
      redis.call('PEXPIRE', w[2], w[4])
    elseif w[1] == 3 then
      redis.call('INCRBY', w[2], w[3])
      if redis.call('PTTL', w[2]) < 0 then redis.call('PEXPIRE', w[2], w[4]) end
    elseif w[1] == 5 then
      redis.call('INCRBY', w[2], w[3])
      redis.call('PEXPIRE', w[2], w[4])
    elseif w[1] == 6 then
      local first, idle_ttl = string.format('%.0f', w[3]), w[4]
      redis.call('SET', w[2], first, 'PX', idle_ttl)
    else
      redis.call('INCR', w[2])
      if redis.call('PTTL', w[2]) < 0 then redis.call('PEXPIRE', w[2], w[3]) end
    end
  end
  redis.call('SET', KEYS[1], 1, 'PX', ARGV[2])
end

local out = {allowed, failed}
for _, v in ipairs(results) do table.insert(out, v) end
for _, v in ipairs(shadow_failed) do table.insert(out, v) end
return out
