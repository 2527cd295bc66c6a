local now, grace, max = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local last = tonumber(redis.call('HGET', KEYS[4], 'last_run') or '0')
local resumed = tonumber(redis.call('HGET', KEYS[4], 'resumed_at') or '0')
if now - last > grace then
  resumed = now
  redis.call('HSET', KEYS[4], 'resumed_at', now)
end
redis.call('HSET', KEYS[4], 'last_run', now)
if now - resumed < grace then return {0, 0, 1} end
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - grace, 'LIMIT', 0, max)
local marked = 0
for _, agent in ipairs(due) do
  redis.call('ZREM', KEYS[1], agent)
  local status, version = state(KEYS[2], agent)
  if status == 'online' then
    marked = marked + 1
    version = math.max(version + 1, now)
    redis.call('HSET', KEYS[2], agent, 'offline:' .. version)
    redis.call('XADD', KEYS[3], '*', 'event',
      event(ARGV[3 + marked], agent, version, now, 'offline', 'missed_heartbeat', 'system:scheduler'))
  end
end
return {marked, #due, 0}
