-- A task's event version: above the last one and at least the time, so that versions stay
-- above what PostgreSQL has seen even if Redis lost its last writes.
local function next_version(versions, task, now)
  local v = math.max(tonumber(redis.call('HGET', versions, task) or '0') + 1, now)
  redis.call('HSET', versions, task, v)
  return v
end
-- The last version of a task whose entry is gone (reported, closed, expired, dead-lettered):
-- its field is dropped so that the hash holds only live tasks. Nothing more is emitted for
-- the task (its entry is deleted and tombstoned or acknowledged).
local function final_version(versions, task, now)
  local v = math.max(tonumber(redis.call('HGET', versions, task) or '0') + 1, now)
  redis.call('HDEL', versions, task)
  return v
end
local function emit(stream, versions, id, task, type_, now, actor, payload, final)
  local v
  if final then v = final_version(versions, task, now) else v = next_version(versions, task, now) end
  redis.call('XADD', stream, '*', 'event', cjson.encode({event_id = id, aggregate_id = 'task:' .. task,
    version = v, occurred_at = now, actor = actor, schema = 2, type = type_, payload = payload}))
end
-- The `task` field of an entry's fields (a flat array), or nil.
local function task_of(fields)
  for i = 1, #fields, 2 do
    if fields[i] == 'task' then return fields[i + 1] end
  end
  return nil
end
local function task_of_entry(stream, id)
  local e = redis.call('XRANGE', stream, id, id)
  if #e == 0 then return nil end
  return task_of(e[1][2])
end
-- Where the lease of `id` in `stream` stands for `agent` at `epoch`:
-- 'ok', or the error code.
-- XPENDING of one entry; empty when the stream or its group does not exist (yet).
local function pending(stream, id)
  local p = redis.pcall('XPENDING', stream, 'agents', id, id, 1)
  if p.err then return {} end
  return p
end
local function fence(stream, closed, id, agent, epoch)
  local p = pending(stream, id)
  if #p == 0 then
    local t = redis.call('GET', closed)
    if t == 'lost' then return 'ERR_LEASE_LOST' end
    if t then return 'ERR_LEASE_CLOSED' end
    return 'ERR_LEASE_UNKNOWN'
  end
  if p[1][2] ~= agent or tonumber(p[1][4]) ~= tonumber(epoch) then return 'ERR_LEASE_LOST' end
  return 'ok'
end
