-- deferred_cancel.lua: cancel a queued entry, or expire one past its expiry
-- (gateway/deferred_store.py).
-- KEYS[1] stream  KEYS[2] entry  KEYS[3] the bytes of the tenant's unfinished entries
-- ARGV[1] group  ARGV[2] 'cancel' | 'expire'
-- ARGV[3] stream id seen by the caller (expire only: dropped when it is stale)
-- Returns {'missing'}, {status} when left as it is, or {'cancelled'|'expired', hold}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local f = redis.call('HMGET', KEYS[2], 'status', 'sid', 'hold', 'expires_ms')
local status, sid = f[1], f[2]
-- include deferred_forget.lua
local function drop(id)
  redis.call('XACK', KEYS[1], ARGV[1], id)
  redis.call('XDEL', KEYS[1], id)
end
if ARGV[2] == 'expire' then
  if not status or sid ~= ARGV[3] or (status ~= 'queued' and status ~= 'running') then
    drop(ARGV[3])  -- a stream entry left behind by a record that is gone or finished
    return {status or 'missing'}
  end
  if status ~= 'queued' or now < tonumber(f[4]) then return {status} end
elseif not status then
  return {'missing'}
elseif status ~= 'queued' then
  return {status}
end
local new = ARGV[2] == 'cancel' and 'cancelled' or 'expired'
redis.call('HSET', KEYS[2], 'status', new, 'finished_ms', string.format('%d', now))
forget_request()  -- kept until the record expires, the body would let a tenant park
-- request bodies for a day each by submitting and cancelling
drop(sid)
return {new, f[3]}
