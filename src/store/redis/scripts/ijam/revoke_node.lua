#!lua
-- revoke_node: status revoked, sealed key erased.
-- KEYS[1] rg:{own:<o>}:node:<id>
-- Reply: {'ok'} | {'unknown'}
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'unknown'}
end
redis.call('HSET', KEYS[1], 'status', 'revoked', 'key', '')
return {'ok'}
