-- forget_request(): what every script that ends a deferred entry does to it (pasted in where
-- they say "-- include deferred_forget.lua" by gateway/state/redis.py load_lua: Redis scripts
-- cannot import). The answer is kept for the grace period, not the request that made it; its
-- bytes leave the tenant's count (deferred.max_queued_bytes). Needs KEYS[2] the entry and
-- KEYS[3] the bytes of the tenant's unfinished entries.
local function forget_request()
  local size = tonumber(redis.call('HGET', KEYS[2], 'size') or '0')
  redis.call('HDEL', KEYS[2], 'body', 'headers', 'size')
  if size > 0 and redis.call('DECRBY', KEYS[3], size) <= 0 then redis.call('DEL', KEYS[3]) end
end
