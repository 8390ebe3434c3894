-- deferred_heartbeat.lua: keep a running entry's claim fresh (gateway/deferred_store.py).
-- KEYS[1] stream   ARGV[1] group  ARGV[2] stream id  ARGV[3] consumer
-- Only while this consumer still owns it: a claim another replica took over is not taken back.
-- Returns 1 when renewed, 0 when the claim is gone.
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if #p == 0 or p[1][2] ~= ARGV[3] then return 0 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, ARGV[2], 'JUSTID')
return 1
