#!lua
-- revoke_node (the portal's layout): status revoked, key erased, as the portal does.
-- KEYS[1] node:<id>
-- Reply: {'ok'} | {'unknown'}
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'unknown'}
end
redis.call('HSET', KEYS[1], 'status', 'revoked', 'encKey', '')
return {'ok'}
