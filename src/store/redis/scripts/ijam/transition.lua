#!lua
-- transition: move a node to a new status if its current status allows it.
-- KEYS[1] rg:{own:<o>}:node:<id>
-- ARGV[1] target status   ARGV[2] '1' to record ip and online_ms (target online), else '0'
-- ARGV[3] ip   ARGV[4] now_ms   ARGV[5..] statuses the target may be reached from
-- Reply: {'unknown'} | {'changed', from} | {'not_allowed', from}
local from = redis.call('HGET', KEYS[1], 'status')
if not from then
  return {'unknown'}
end
for i = 5, #ARGV do
  if ARGV[i] == from then
    if ARGV[2] == '1' then
      redis.call('HSET', KEYS[1], 'status', ARGV[1], 'ip', ARGV[3], 'online_ms', ARGV[4])
    else
      redis.call('HSET', KEYS[1], 'status', ARGV[1])
    end
    return {'changed', from}
  end
end
return {'not_allowed', from}
