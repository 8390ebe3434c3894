-- deferred_submit.lua: store one deferred entry and queue it (gateway/deferred_store.py).
-- KEYS[1] the tenant's stream   KEYS[2] the entry's hash      (one {t:<tenant>} hash tag)
-- KEYS[3] the bytes of the tenant's unfinished entries
-- ARGV[1] group  ARGV[2] entry id  ARGV[3] max queued  ARGV[4] ttl ms  ARGV[5] grace ms
-- ARGV[6] this entry's bytes  ARGV[7] max bytes
-- ARGV[8..] field, value pairs of the entry
-- Returns {1, position, created_ms, expires_ms}, or {0, depth, held bytes} when the queue is
-- full (by entries or by bytes).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local depth = redis.call('XLEN', KEYS[1])
-- Nothing queued holds nothing: an entry whose record expired before it ended (a sweeper
-- far behind, a run past the grace period) took its size with it, and the count heals here.
if depth == 0 then redis.call('DEL', KEYS[3]) end
local held, size = tonumber(redis.call('GET', KEYS[3]) or '0'), tonumber(ARGV[6])
if depth >= tonumber(ARGV[3]) then return {0, depth} end
if held > 0 and held + size > tonumber(ARGV[7]) then return {0, depth, held} end
local ttl, grace = tonumber(ARGV[4]), tonumber(ARGV[5])
local expires = now + ttl
-- The group is created with the stream, from id 0 so no entry is ever skipped; BUSYGROUP
-- (it exists) is the usual answer and is ignored.
redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[1], '0', 'MKSTREAM')
local sid = redis.call('XADD', KEYS[1], '*', 'id', ARGV[2], 'exp', string.format('%d', expires))
redis.call('HSET', KEYS[2], 'status', 'queued', 'sid', sid,
           'created_ms', string.format('%d', now), 'expires_ms', string.format('%d', expires),
           'runs', 0, 'finished', 0, 'size', ARGV[6], unpack(ARGV, 8))
redis.call('PEXPIRE', KEYS[2], ttl + grace)
if size > 0 then redis.call('INCRBY', KEYS[3], size) end
-- The stream outlives every entry in it; an idle tenant's stream (and group) goes away.
if redis.call('PTTL', KEYS[1]) < ttl + grace then redis.call('PEXPIRE', KEYS[1], ttl + grace) end
-- The counter as long as the stream: entries that end take their bytes off; those that never
-- do (their tenant's stream forgotten) go with it.
if redis.call('PTTL', KEYS[3]) < ttl + grace then redis.call('PEXPIRE', KEYS[3], ttl + grace) end
return {1, depth + 1, now, expires}
