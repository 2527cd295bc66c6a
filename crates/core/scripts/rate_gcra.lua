-- One request against one rate: the generic cell rate algorithm (GCRA), on Redis's own clock
-- so that every gateway replica agrees whatever their clocks say.
-- KEYS[1]: the rate key of one (endpoint, caller): its theoretical arrival time (ms).
-- ARGV[1]: the emission interval (ms): one request per interval on average.
-- ARGV[2]: the burst: requests allowed at once (at least 1).
-- ARGV[3]: 1 to count the request, 0 only to look whether one would be allowed.
-- Returns {allowed (1 or 0), remaining, retry after (ms), reset (ms: until the burst is whole)}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then
  tat = now
end
local new_tat = tat + interval
local allow_at = new_tat - interval * burst
if now < allow_at then
  return {0, 0, allow_at - now, tat - now}
end
if ARGV[3] == '0' then
  return {1, math.floor((now - allow_at) / interval), 0, tat - now}
end
redis.call('SET', KEYS[1], new_tat, 'PX', new_tat - now)
return {1, math.floor((now - allow_at) / interval), 0, new_tat - now}
