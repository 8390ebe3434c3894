-- deferred_finish.lua: end a run (gateway/deferred_store.py).
-- KEYS[1] stream  KEYS[2] entry  KEYS[3] the bytes of the tenant's unfinished entries
-- ARGV[1] group  ARGV[2] stream id  ARGV[3] consumer  ARGV[4] run
-- ARGV[5] mode: 'done' (final answer), 'retry' (back to the queue after reaching the
--         upstream), 'nocall' (back to the queue; the run never reached the upstream)
-- ARGV[6] charge: 'actual' | 'reserved' | 'none' (how this run is charged, if nobody has)
-- ARGV[7] run info (JSON)
-- done:          ARGV[8] status (succeeded|failed)  ARGV[9] http status  ARGV[10] headers
--                ARGV[11] body  ARGV[12] grace ms
-- retry, nocall: ARGV[8] delay ms  ARGV[9] visibility timeout ms
-- Returns {won, charge}: won 1 when this call wrote the final answer; charge 1 when the caller
-- must charge this run (nobody charged it before).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local run, mode = tonumber(ARGV[4]), ARGV[5]
local f = redis.call('HMGET', KEYS[2], 'status', 'runs', 'finished')
local status = f[1]
-- include deferred_forget.lua
local function drop()
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
  redis.call('XDEL', KEYS[1], ARGV[2])
end
if not status then
  drop()
  return {0, ARGV[6] ~= 'none' and 1 or 0}
end
local runs = tonumber(f[2])
local current = status == 'running' and runs == run
local function back_to_queue(delay)
  local vis = tonumber(ARGV[9])
  redis.call('HSET', KEYS[2], 'status', 'queued', 'not_before_ms', string.format('%d', now + delay))
  -- Idle for (visibility - delay): re-claimable by any replica once the delay is over.
  redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, ARGV[2], 'IDLE',
             math.max(0, vis - delay), 'JUSTID')
end
if mode == 'nocall' then
  if not current then return {0, 0} end
  redis.call('HSET', KEYS[2], 'runs', run - 1, 'finished', run - 1)
  redis.call('HDEL', KEYS[2], 'run:' .. run)
  back_to_queue(tonumber(ARGV[8]))
  return {0, 0}
end
local charge = 0
if ARGV[6] ~= 'none' then charge = redis.call('HSETNX', KEYS[2], 'charged:' .. run, ARGV[6]) end
redis.call('HSET', KEYS[2], 'run:' .. run, ARGV[7])
if tonumber(f[3]) < run then redis.call('HSET', KEYS[2], 'finished', run) end
if mode == 'retry' then
  if current then back_to_queue(tonumber(ARGV[8])) end
  return {0, charge}
end
if status ~= 'queued' and status ~= 'running' then return {0, charge} end
redis.call('HSET', KEYS[2], 'status', ARGV[8], 'code', ARGV[9], 'rheaders', ARGV[10],
           'rbody', ARGV[11], 'finished_ms', string.format('%d', now))
forget_request()
drop()
local grace = tonumber(ARGV[12])
if redis.call('PTTL', KEYS[2]) < grace then redis.call('PEXPIRE', KEYS[2], grace) end
return {1, charge}
