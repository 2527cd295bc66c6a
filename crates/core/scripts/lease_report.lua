local agent, now = ARGV[1], tonumber(ARGV[2])
local out = {}
local n = (#ARGV - 3) / 7
for r = 1, n do
  local a = 3 + 7 * (r - 1)
  local token, id, epoch, kind, eid, outcome, result =
    ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5], ARGV[a + 6], ARGV[a + 7]
  local stream, closed, reported, relay = KEYS[4 * r], KEYS[1 + 4 * r], KEYS[2 + 4 * r], KEYS[3 + 4 * r]
  local cached = redis.call('GET', reported)
  if cached then
    out[r] = cached
  else
    local f = fence(stream, closed, id, agent, epoch)
    if f ~= 'ok' then
      out[r] = f
    else
      local task_id = task_of_entry(stream, id)
      redis.call('XACK', stream, 'agents', id)
      redis.call('XDEL', stream, id)
      redis.call('ZREM', KEYS[1], token)
      -- The result is spliced in as sent (already valid JSON): a decode and re-encode in Lua
      -- would turn empty arrays into objects.
      local task = agent .. ':' .. kind .. ':' .. id
      if kind == 'haproxy' then
        redis.call('RPUSH', relay, outcome .. ' ' .. result)
        redis.call('PEXPIRE', relay, 60000)
        result = '{"relayed_bytes":' .. #result .. '}'
      end
      local v = final_version(KEYS[3], task, now)
      local ev = cjson.encode({event_id = eid, aggregate_id = 'task:' .. task, version = v,
        occurred_at = now, actor = 'agent:' .. agent, schema = 2, type = 'lease.reported',
        payload = {agent_id = agent, kind = kind, entry = id, epoch = tonumber(epoch),
        outcome = outcome, result = '@@RESULT@@', task = task_id}})
      local i, j = string.find(ev, '"@@RESULT@@"', 1, true)
      ev = string.sub(ev, 1, i - 1) .. result .. string.sub(ev, j + 1)
      redis.call('XADD', KEYS[2], '*', 'event', ev)
      redis.call('SET', reported, 'acknowledged', 'PX', ARGV[3])
      out[r] = 'acknowledged'
    end
  end
end
return out
