local agent, now = ARGV[1], tonumber(ARGV[2])
local status, version = state(KEYS[2], agent)
-- A revoked agent's heartbeat (one authenticated just before the revocation) moves nothing.
if status == 'revoked' then return {-1, version} end
redis.call('ZADD', KEYS[1], ARGV[3], agent)
if status == 'online' then return {0, version} end
version = math.max(version + 1, now)
redis.call('HSET', KEYS[2], agent, 'online:' .. version)
redis.call('XADD', KEYS[3], '*', 'event',
  event(ARGV[4], agent, version, now, 'online', 'heartbeat', 'agent:' .. agent))
return {1, version}
