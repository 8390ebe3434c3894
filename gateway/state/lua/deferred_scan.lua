-- deferred_scan.lua: one tenant's queue at a glance (gateway/deferred_store.py).
-- KEYS[1] stream   ARGV[1] group  ARGV[2] entries to list  ARGV[3] consumer idle ms to forget
-- (-1: keep all)
-- Returns {now ms, depth, then stream id, entry id, expires ms of the oldest entries...}.
-- Consumers (replicas) idle longer than ARGV[3] with nothing pending are deleted, so replica
-- restarts do not pile up consumers.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('EXISTS', KEYS[1]) == 0 then return {now, 0} end
local out = {now, redis.call('XLEN', KEYS[1])}
for _, e in ipairs(redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', tonumber(ARGV[2]))) do
  local fields = e[2]
  out[#out + 1] = e[1]
  out[#out + 1] = fields[2]
  out[#out + 1] = fields[4]
end
local forget = tonumber(ARGV[3])
if forget >= 0 then
  local ok, consumers = pcall(redis.call, 'XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
  if ok then
    for _, c in ipairs(consumers) do
      local info = {}
      for i = 1, #c, 2 do info[c[i]] = c[i + 1] end
      if info['pending'] == 0 and info['idle'] > forget then
        redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info['name'])
      end
    end
  end
end
return out
