local cached = redis.call('GET', KEYS[3])
if cached then return cached end
local agent, now, ttl, maxd = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local nk = tonumber(ARGV[6])
-- A revoked agent (its claim authenticated just before the revocation) is granted nothing.
local presence = redis.call('HGET', KEYS[6 + nk], agent)
if presence and string.sub(presence, 1, 8) == 'revoked:' then return '[]' end
local next_id = 7 + 2 * nk
local function eid() local id = ARGV[next_id]; next_id = next_id + 1; return id end
local out = {}
for k = 1, nk do
  local kind, want = ARGV[5 + 2 * k], tonumber(ARGV[6 + 2 * k])
  local stream = KEYS[5 + k]
  local entries, reclaimed = {}, 0
  -- No stream yet means nothing was ever enqueued for this agent and kind (enqueue makes
  -- it with its group).
  local auto = want > 0 and redis.call('EXISTS', stream) == 1
    and redis.pcall('XAUTOCLAIM', stream, 'agents', agent, ttl, '0-0', 'COUNT', want)
  if auto and not auto.err then
    for _, e in ipairs(auto[2]) do entries[#entries + 1] = e end
    reclaimed = #entries
    local rest = want - #entries
    if rest > 0 then
      local read = redis.call('XREADGROUP', 'GROUP', 'agents', agent, 'COUNT', rest, 'STREAMS', stream, '>')
      if read then for _, e in ipairs(read[1][2]) do entries[#entries + 1] = e end end
    end
  end
  for n, e in ipairs(entries) do
    local id, fields = e[1], e[2]
    -- A new entry ('>') is on its first delivery; a reclaimed one has its count in the PEL.
    local deliveries = 1
    if n <= reclaimed then
      deliveries = tonumber(redis.call('XPENDING', stream, 'agents', id, id, 1)[1][4])
    end
    local task = agent .. ':' .. kind .. ':' .. id
    -- This script may run well after `now` was taken (its call waited out a Redis restart),
    -- possibly after the entry was added: its events are never dated before the entry (the
    -- entry id's time), so a replay in time order never meets them before their task's check.
    local at = math.max(now, tonumber(string.match(id, '^(%d+)')))
    if deliveries > maxd then
      redis.call('XACK', stream, 'agents', id)
      redis.call('XDEL', stream, id)
      redis.call('XADD', KEYS[4], 'MAXLEN', '~', 10000, '*', 'agent', agent, 'kind', kind,
        'entry', id, 'reason', 'max_deliveries', 'deliveries', deliveries, unpack(fields))
      emit(KEYS[2], KEYS[5], eid(), task, 'task.dead_lettered', at, 'system:gateway',
        {agent_id = agent, kind = kind, entry = id, deliveries = deliveries, task = task_of(fields),
         waits = true}, true)
    else
      local token = agent .. '.' .. kind .. '.' .. id .. '.' .. deliveries
      redis.call('ZADD', KEYS[1], now + ttl, token)
      emit(KEYS[2], KEYS[5], eid(), task, 'lease.granted', at, 'agent:' .. agent,
        {agent_id = agent, kind = kind, entry = id, epoch = deliveries, deadline = now + ttl,
         task = task_of(fields)})
      out[#out + 1] = cjson.encode({token = token, kind = kind, fields = fields, deadline = now + ttl})
    end
  end
end
local reply = '[' .. table.concat(out, ',') .. ']'
-- Only a reply with leases is remembered: an empty one lost costs nothing, and a waiting
-- claim re-runs with the same request_id.
if #out > 0 then redis.call('SET', KEYS[3], reply, 'PX', ARGV[5]) end
return reply
