local agent, now, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local out, extended = {}, {}
local n = (#ARGV - 4) / 3
for i = 1, n do
  local token, id, epoch = ARGV[2 + 3 * i], ARGV[3 + 3 * i], ARGV[4 + 3 * i]
  local stream, closed = KEYS[2 + 2 * i], KEYS[3 + 2 * i]
  local f = fence(stream, closed, id, agent, epoch)
  if f == 'ok' then
    redis.call('XCLAIM', stream, 'agents', agent, 0, id, 'JUSTID')
    redis.call('ZADD', KEYS[1], now + ttl, token)
    out[i] = tostring(now + ttl)
    extended[#extended + 1] = token
  else
    out[i] = f
  end
end
if #extended > 0 then
  local v = next_version(KEYS[3], 'extend:' .. agent, now)
  redis.call('XADD', KEYS[2], '*', 'event', cjson.encode({event_id = ARGV[4],
    aggregate_id = 'extend:' .. agent, version = v, occurred_at = now, actor = 'agent:' .. agent,
    schema = 2, type = 'lease.extended', payload = {agent_id = agent, tokens = extended,
    deadline = now + ttl}}))
end
return out
