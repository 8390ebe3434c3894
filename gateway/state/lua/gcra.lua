-- GCRA state in integers, shared by admit.lua and settle.lua (pasted in where they say
-- "-- include gcra.lua" by gateway/state/redis.py load_lua: Redis scripts cannot import).
-- Units, bounds and why doubles stay exact: "GCRA in integers" in gateway/ratelimit.py. The
-- state is the TAT as 'ms:frac:Q' = ms + frac/Q milliseconds; decisions use its distance ahead
-- of now in 1/Q ms. Needs `now_ms` (whole milliseconds of the server's clock) in scope.
-- A settlement leaves a TAT at most 2^52 units of 1/Q ms ahead (GCRA_MAX_AHEAD in
-- ratelimit.py: beyond 2^53 doubles round).
local GCRA_MAX_AHEAD = 4503599627370496
local function gcra_ahead(raw, q)
  if not raw then return 0 end
  local ms, frac, per = string.match(raw, '^(%d+):(%d+):(%d+)$')
  if not ms then return 0 end
  ms, frac = tonumber(ms), tonumber(frac)
  if tonumber(per) ~= q and frac > 0 then ms, frac = ms + 1, 0 end  -- the rate changed
  if ms < now_ms then return 0 end
  return (ms - now_ms) * q + frac
end
local function gcra_state(ahead, q)
  local frac = ahead % q
  return string.format('%.0f:%.0f:%.0f', now_ms + (ahead - frac) / q, frac, q)
end
