-- deferred_start.lua: begin a run of a claimed entry (gateway/deferred_store.py).
-- KEYS[1] stream  KEYS[2] entry  KEYS[3] the bytes of the tenant's unfinished entries
-- ARGV[1] group  ARGV[2] stream id  ARGV[3] consumer
-- Runs that were started and never finished (their replica died) are charged their
-- reservation here, once each: 'charged:<run>' is set first by whoever accounts that run.
-- Returns
--   {'gone'}                        the record expired away: the stream entry is dropped
--   {'done', status}                already finished or cancelled: the stream entry is dropped
--   {'later', wait_ms}              a retry backoff is not over yet
--   {'expired', hold, lost runs...} past its expiry: refund the hold, charge the lost runs
--   {'run', run, hold, route, model, body, headers, lost runs...}
-- include deferred_forget.lua
local function drop()
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
  redis.call('XDEL', KEYS[1], ARGV[2])
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local f = redis.call('HMGET', KEYS[2], 'status', 'expires_ms', 'runs', 'finished',
                     'not_before_ms', 'sid')
local status = f[1]
if not status then drop() return {'gone'} end
if (status ~= 'queued' and status ~= 'running') or f[6] ~= ARGV[2] then
  drop()
  return {'done', status}
end
local runs, finished = tonumber(f[3]), tonumber(f[4])
local lost = {}
for k = finished + 1, runs do
  if redis.call('HSETNX', KEYS[2], 'charged:' .. k, 'reserved') == 1 then lost[#lost + 1] = k end
end
if runs > finished then redis.call('HSET', KEYS[2], 'finished', runs) end
if now >= tonumber(f[2]) then
  redis.call('HSET', KEYS[2], 'status', 'expired', 'finished_ms', string.format('%d', now))
  forget_request()
  drop()
  return {'expired', redis.call('HGET', KEYS[2], 'hold'), unpack(lost)}
end
if status == 'queued' and f[5] and tonumber(f[5]) > now then
  return {'later', tonumber(f[5]) - now}
end
runs = runs + 1
redis.call('HSET', KEYS[2], 'status', 'running', 'runs', runs, 'finished', runs - 1,
           'run:' .. runs, cjson.encode({replica = ARGV[3], started_ms = now}))
local e = redis.call('HMGET', KEYS[2], 'hold', 'route', 'model', 'body', 'headers')
return {'run', runs, e[1], e[2], e[3], e[4], e[5], unpack(lost)}
