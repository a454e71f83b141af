#!lua
-- transition: move a node to a new status if its current status allows it, and
-- remember the frame that did it; the same frame again changes nothing ('repeated':
-- a replay, or a retry whose reply was lost).
-- KEYS[1] rg:{own:<o>}:node:<id>
-- ARGV[1] target status   ARGV[2] '1' to record ip and online_ms (target online), else '0'
-- ARGV[3] ip   ARGV[4] now_ms   ARGV[5] the frame's SHA-256 (hex)
-- ARGV[6..] statuses the target may be reached from
-- Reply: {'unknown'} | {'changed', from} | {'not_allowed', from} | {'repeated', status}
local rec = redis.call('HMGET', KEYS[1], 'status', 'last_state')
local from = rec[1]
if not from then
  return {'unknown'}
end
if rec[2] == ARGV[5] then
  return {'repeated', from}
end
for i = 6, #ARGV do
  if ARGV[i] == from then
    if ARGV[2] == '1' then
      redis.call('HSET', KEYS[1], 'status', ARGV[1], 'ip', ARGV[3], 'online_ms', ARGV[4],
        'last_state', ARGV[5])
    else
      redis.call('HSET', KEYS[1], 'status', ARGV[1], 'last_state', ARGV[5])
    end
    return {'changed', from}
  end
end
return {'not_allowed', from}
