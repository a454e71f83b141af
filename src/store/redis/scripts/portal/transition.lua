#!lua
-- transition (the portal's layout): a state change as the portal's state server makes
-- it: online sets ip and lastOnlineOn, offline clears ip and sets lastOnlineOn,
-- loading sets lastOnlineOn. A node registered before ARGV[4] has expired (90 days):
-- it is marked so, its key erased, as the portal's expiry writes it. The frame that
-- changed it is remembered in a key of Registrar's own (the portal never reads it):
-- the same frame again changes nothing ('repeated').
-- KEYS[1] node:<id>   KEYS[2] registrar:state:<id>
-- ARGV[1] target status   ARGV[2] ip   ARGV[3] now_ms
-- ARGV[4] registrations before this time (ms) have expired
-- ARGV[5] the frame's SHA-256 (hex)   ARGV[6] how long to remember it (ms)
-- ARGV[7..] allowed origins
-- Reply: {'unknown'} | {'changed', from} | {'not_allowed', from} | {'repeated', status}
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
if redis.call('GET', KEYS[2]) == ARGV[5] then
  return {'repeated', from}
end
for i = 7, #ARGV do
  if ARGV[i] == from then
    if ARGV[1] == 'online' then
      redis.call('HSET', KEYS[1], 'status', 'online', 'ip', ARGV[2], 'lastOnlineOn', ARGV[3])
    elseif ARGV[1] == 'offline' then
      redis.call('HSET', KEYS[1], 'status', 'offline', 'ip', '', 'lastOnlineOn', ARGV[3])
    else
      redis.call('HSET', KEYS[1], 'status', ARGV[1], 'lastOnlineOn', ARGV[3])
    end
    redis.call('SET', KEYS[2], ARGV[5], 'PX', ARGV[6])
    return {'changed', from}
  end
end
return {'not_allowed', from}
