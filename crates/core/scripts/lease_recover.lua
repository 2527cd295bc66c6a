local token, agent, kind, id, epoch, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6])
local score = redis.call('ZSCORE', KEYS[1], token)
-- ARGV[9] 'revoked': the agent was revoked, its leases end now, due or not.
local revoked = ARGV[9] == 'revoked'
if not score or (not revoked and tonumber(score) > now) then return 'not_due' end
local hb = redis.call('ZSCORE', KEYS[6], agent)
if not revoked and hb and tonumber(hb) >= now then return 'alive' end
redis.call('ZREM', KEYS[1], token)
if fence(KEYS[4], KEYS[5], id, agent, epoch) ~= 'ok' then return 'stale' end
local task_id = task_of_entry(KEYS[4], id)
redis.call('XACK', KEYS[4], 'agents', id)
redis.call('XDEL', KEYS[4], id)
redis.call('SET', KEYS[5], 'lost', 'PX', ARGV[8])
emit(KEYS[2], KEYS[3], ARGV[7], agent .. ':' .. kind .. ':' .. id, 'lease.expired', now,
  ARGV[10] or 'system:scheduler', {agent_id = agent, kind = kind, entry = id, epoch = tonumber(epoch),
   task = task_id}, true)
return 'expired'
