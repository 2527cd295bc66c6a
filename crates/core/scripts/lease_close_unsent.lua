if redis.call('SET', KEYS[1], 'closed', 'NX', 'PX', ARGV[1]) then return false end
return redis.call('GET', KEYS[1])
