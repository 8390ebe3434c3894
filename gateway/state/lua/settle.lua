-- settle.lua: apply a request's real usage once (SettlePlan in gateway/ratelimit.py).
-- Idempotent per request id: the done marker makes a replay a no-op. With the hold marker
-- present the reservation is adjusted by (actual - reserved); without it (admitted while Redis
-- was unreachable) the whole actual usage is charged.
--
-- KEYS[1] done marker   KEYS[2] hold marker
-- then the GCRA keys, the counter keys and the lease keys, in that order
-- ARGV[1] request id   ARGV[2] done ttl ms   ARGV[3..5] number of gcra, counter, lease keys
-- then per GCRA: P, Q (the interval P/Q ms), reserved, actual; per counter: reserved, actual,
-- ttl_ms
-- Returns 1 when applied, 0 when this request id was settled before.
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

-- GCRA in integers: gcra_ahead / gcra_state, shared with admit.lua.
-- include gcra.lua
local held = redis.call('EXISTS', KEYS[2]) == 1
local ng, nc, nl = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local a, k = 6, 3

for _ = 1, ng do
  local p, q = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  local reserved, actual = tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  a = a + 4
  local key = KEYS[k]
  k = k + 1
  local delta = actual
  if held then delta = actual - reserved end
  if delta ~= 0 then
    -- Charged from max(TAT, now), refunded down to now at most (as LocalLimits.settle).
    local ahead = math.min(math.max(0, gcra_ahead(redis.call('GET', key), q) + delta * p),
                           GCRA_MAX_AHEAD)
    if ahead > 0 then
      redis.call('SET', key, gcra_state(ahead, q), 'PX', -math.floor(-ahead / q))
    else
      redis.call('DEL', key)
    end
  end
end

for _ = 1, nc do
  local reserved, actual, ttl = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  a = a + 3
  local key = KEYS[k]
  k = k + 1
  local delta = actual
  if held then delta = actual - reserved end
  local used = redis.call('GET', key)
  if not used then
    if delta > 0 then redis.call('SET', key, delta, 'PX', ttl) end
  else
    local v = tonumber(used) + delta
    if v < 0 then v = 0 end
    redis.call('SET', key, v, 'KEEPTTL')
  end
end

for _ = 1, nl do
  redis.call('ZREM', KEYS[k], ARGV[1])
  k = k + 1
end
redis.call('DEL', KEYS[2])
redis.call('SET', KEYS[1], 1, 'PX', ARGV[2])
return 1
