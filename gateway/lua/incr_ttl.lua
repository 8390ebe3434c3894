-- incr_ttl.lua: add to a counter and give it a TTL when this call created it, atomically.
--
-- KEYS[1]  the counter key (one key only, so the script is slot-safe on Redis Cluster)
-- ARGV[1]  amount to add, a decimal integer (may be negative)
-- ARGV[2]  TTL in milliseconds for a key that has none after the add (> 0)
--
-- Returns the counter's new value (integer).
--
-- PTTL == -1 after INCRBY means "exists without an expiry": either INCRBY just created the
-- key or something wrote it without a TTL outside the gateway. Both get the TTL, so no
-- counter can live forever; a key that already had a TTL keeps it untouched.
local value = redis.call('INCRBY', KEYS[1], ARGV[1])
if redis.call('PTTL', KEYS[1]) == -1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return value
