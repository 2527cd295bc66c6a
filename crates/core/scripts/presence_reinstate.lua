local status, version = state(KEYS[1], ARGV[1])
if status ~= 'revoked' then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], 'offline:' .. version)
return 1
