#!lua
-- revoke_device: end a device's binding for good (the key stays, for audit).
-- KEYS[1] rg:{dev:<hex id>}
-- ARGV[1] now_ms
-- Reply: {'ok'} | {'unknown'}
local status = redis.call('HGET', KEYS[1], 'status')
if not status then
  return {'unknown'}
end
if status ~= 'revoked' then
  redis.call('HSET', KEYS[1], 'status', 'revoked', 'revoked_ms', ARGV[1])
end
return {'ok'}
