-- renew.lua: push the expiry of live concurrency leases forward (long streams keep their slot).
-- KEYS[1] lease sorted set   ARGV[1] ttl ms   ARGV[2..] members (request ids)
-- Only members still present are renewed (XX): a lease that already expired stays gone.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local ttl = tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', now + ttl, ARGV[i])
end
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('PEXPIRE', KEYS[1], ttl) end
return 1
