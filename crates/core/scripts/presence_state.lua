local function state(hash, agent)
  local s = redis.call('HGET', hash, agent)
  if not s then return 'registered', 0 end
  local sep = string.find(s, ':', 1, true)
  return string.sub(s, 1, sep - 1), tonumber(string.sub(s, sep + 1))
end
local function event(id, agent, version, now, status, reason, actor)
  return cjson.encode({event_id = id, aggregate_id = 'presence:' .. agent, version = version,
    occurred_at = now, actor = actor, schema = 2, type = 'agent.' .. status,
    payload = {agent_id = agent, reason = reason}})
end
