-- deferred_submit.lua: store one deferred entry and queue it (gateway/deferred_store.py).
-- KEYS[1] the tenant's stream   KEYS[2] the entry's hash      (one {t:<tenant>} hash tag)
-- ARGV[1] group  ARGV[2] entry id  ARGV[3] max queued  ARGV[4] ttl ms  ARGV[5] grace ms
-- ARGV[6..] field, value pairs of the entry
-- Returns {1, position, created_ms, expires_ms}, or {0, depth} when the queue is full.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local depth = redis.call('XLEN', KEYS[1])
if depth >= tonumber(ARGV[3]) then return {0, depth} end
local ttl, grace = tonumber(ARGV[4]), tonumber(ARGV[5])
local expires = now + ttl
-- The group is created with the stream, from id 0 so no entry is ever skipped; BUSYGROUP
-- (it exists) is the usual answer and is ignored.
redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[1], '0', 'MKSTREAM')
local sid = redis.call('XADD', KEYS[1], '*', 'id', ARGV[2], 'exp', string.format('%d', expires))
redis.call('HSET', KEYS[2], 'status', 'queued', 'sid', sid,
           'created_ms', string.format('%d', now), 'expires_ms', string.format('%d', expires),
           'runs', 0, 'finished', 0, unpack(ARGV, 6))
redis.call('PEXPIRE', KEYS[2], ttl + grace)
-- The stream outlives every entry in it; an idle tenant's stream (and group) goes away.
if redis.call('PTTL', KEYS[1]) < ttl + grace then redis.call('PEXPIRE', KEYS[1], ttl + grace) end
return {1, depth + 1, now, expires}
