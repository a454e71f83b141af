#!lua
-- transition (the portal's layout): a state change as the portal's state server makes
-- it: online sets ip and lastOnlineOn, offline clears ip and sets lastOnlineOn,
-- loading sets lastOnlineOn. A node registered before ARGV[4] has expired (90 days):
-- it is marked so, its key erased, as the portal's expiry writes it.
-- KEYS[1] node:<id>
-- ARGV[1] target status   ARGV[2] ip   ARGV[3] now_ms
-- ARGV[4] registrations before this time (ms) have expired   ARGV[5..] allowed origins
-- Reply: {'unknown'} | {'changed', from} | {'not_allowed', from}
local rec = redis.call('HMGET', KEYS[1], 'status', 'lastRegisteredOn')
local from = rec[1]
if not from then
  return {'unknown'}
end
local registered = tonumber(rec[2] or '0') or 0
if from ~= 'revoked' and from ~= 'expired' and registered ~= 0
    and registered < tonumber(ARGV[4]) then
  redis.call('HSET', KEYS[1], 'status', 'expired', 'encKey', '')
  return {'not_allowed', 'expired'}
end
for i = 5, #ARGV do
  if ARGV[i] == from then
    if ARGV[1] == 'online' then
      redis.call('HSET', KEYS[1], 'status', 'online', 'ip', ARGV[2], 'lastOnlineOn', ARGV[3])
    elseif ARGV[1] == 'offline' then
      redis.call('HSET', KEYS[1], 'status', 'offline', 'ip', '', 'lastOnlineOn', ARGV[3])
    else
      redis.call('HSET', KEYS[1], 'status', ARGV[1], 'lastOnlineOn', ARGV[3])
    end
    return {'changed', from}
  end
end
return {'not_allowed', from}
