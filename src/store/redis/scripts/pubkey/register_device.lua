#!lua
-- register_device: bind a public key to a device id, unless the id is taken.
-- KEYS[1] rg:{dev:<hex id>}
-- ARGV[1] public key (SPKI DER, hex)   ARGV[2] now_ms
-- Reply: {'created'} | {'same_key'} | {'other_key'} | {'revoked'}
-- Never overwrites: only `registrar device revoke` changes a binding.
local rec = redis.call('HMGET', KEYS[1], 'public_key', 'status')
if not rec[1] then
  redis.call('HSET', KEYS[1], 'public_key', ARGV[1], 'status', 'active',
    'registered_ms', ARGV[2], 'attested_ms', '0', 'attestations', '0', 'revoked_ms', '0')
  return {'created'}
end
if rec[2] == 'revoked' then
  return {'revoked'}
end
if rec[1] == ARGV[1] then
  return {'same_key'}
end
return {'other_key'}
