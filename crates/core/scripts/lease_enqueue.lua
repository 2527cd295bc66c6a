local out = {}
for i = 1, #KEYS / 2 do
  local stream, ref = KEYS[2 * i - 1], KEYS[2 * i]
  local spec, agent, task = ARGV[3 * i], ARGV[3 * i + 1], ARGV[3 * i + 2]
  local known = task ~= '' and redis.call('GET', ref)
  if known then
    out[i] = known
  else
    if redis.call('EXISTS', stream) == 0 then
      redis.call('XGROUP', 'CREATE', stream, 'agents', '0', 'MKSTREAM')
    end
    if task ~= '' then
      out[i] = redis.call('XADD', stream, '*', 'task', task, 'spec', spec)
      redis.call('SET', ref, out[i], 'PX', ARGV[2])
    else
      out[i] = redis.call('XADD', stream, '*', 'spec', spec)
    end
    redis.call('PUBLISH', ARGV[1], agent)
  end
end
return out
