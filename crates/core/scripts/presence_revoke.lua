local agent, now = ARGV[1], tonumber(ARGV[2])
redis.call('ZREM', KEYS[1], agent)
local status, version = state(KEYS[2], agent)
if status == 'revoked' then return 0 end
if status == 'online' then
  version = math.max(version + 1, now)
  redis.call('XADD', KEYS[3], '*', 'event',
    event(ARGV[3], agent, version, now, 'offline', 'revoked', ARGV[4]))
end
redis.call('HSET', KEYS[2], agent, 'revoked:' .. version)
return 1
