-- deferred_claim.lua: the next stream entry for this consumer (gateway/deferred_store.py):
-- one whose claim went idle (its replica died or released it) first, else a new one.
-- KEYS[1] stream   ARGV[1] group  ARGV[2] consumer  ARGV[3] min idle ms (-1: no re-claim)
-- ARGV[4] XAUTOCLAIM cursor
-- Returns {next cursor} when there is nothing, else {next cursor, stream id, entry id, 0|1}
-- (1: re-claimed).
if redis.call('EXISTS', KEYS[1]) == 0 then return {'0-0'} end
local cursor = ARGV[4]
if tonumber(ARGV[3]) >= 0 then
  local r = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], cursor, 'COUNT', 1)
  cursor = r[1]
  local got = r[2][1]
  if got then return {cursor, got[1], got[2][2], 1} end
end
local r = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', 1, 'STREAMS', KEYS[1], '>')
if r and r[1] and r[1][2][1] then
  local got = r[1][2][1]
  return {cursor, got[1], got[2][2], 0}
end
return {cursor}
