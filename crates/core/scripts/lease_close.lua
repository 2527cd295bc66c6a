local agent, kind, id, now = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local function ended()
  local newest = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
  if #newest == 0 then return '0-0' end
  return newest[1][1]
end
if redis.call('EXISTS', KEYS[5]) == 1 then return ended() end
local p = pending(KEYS[4], id)
local exists = #redis.call('XRANGE', KEYS[4], id, id) > 0
if #p == 0 and not exists then return ended() end
if #p > 0 then
  redis.call('ZREM', KEYS[1], agent .. '.' .. kind .. '.' .. id .. '.' .. p[1][4])
  redis.call('XACK', KEYS[4], 'agents', id)
end
redis.call('XDEL', KEYS[4], id)
redis.call('SET', KEYS[5], ARGV[7], 'PX', ARGV[8])
emit(KEYS[2], KEYS[3], ARGV[5], agent .. ':' .. kind .. ':' .. id, 'lease.closed', now,
  'system:scheduler', {agent_id = agent, kind = kind, entry = id, reason = ARGV[6],
   task = (ARGV[9] ~= '' and ARGV[9]) or nil}, true)
return 1
