-- register_device: bind a public key to a device id, unless the id is taken.
-- KEYS[1] rg:{dev:<hex id>}   KEYS[2] rg:devices (cross-slot: see schemas/redis-keys.md)
-- ARGV[1] device id (32 hex)   ARGV[2] public key (SPKI DER, hex)   ARGV[3] now_ms
-- Reply: {'created'} | {'same_key'} | {'other_key'} | {'revoked'}
-- Never overwrites: only `registrar device revoke` changes a binding.
local rec = redis.call('HMGET', KEYS[1], 'public_key', 'status')
if not rec[1] then
  redis.call('HSET', KEYS[1], 'public_key', ARGV[2], 'status', 'active',
    'registered_ms', ARGV[3], 'attested_ms', '0', 'attestations', '0', 'revoked_ms', '0')
  redis.call('SADD', KEYS[2], ARGV[1])
  return {'created'}
end
if rec[2] == 'revoked' then
  return {'revoked'}
end
if rec[1] == ARGV[2] then
  return {'same_key'}
end
return {'other_key'}
