if redis.call('XDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('XGROUP', 'CREATE', KEYS[2], 'agents', '0', 'MKSTREAM')
end
redis.call('XADD', KEYS[2], '*', 'spec', ARGV[2])
redis.call('PUBLISH', ARGV[4], ARGV[3])
return 1
