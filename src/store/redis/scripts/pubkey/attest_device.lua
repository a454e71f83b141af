#!lua
-- attest_device: use a challenge nonce once and record the attestation, atomically.
-- KEYS[1] rg:{dev:<hex id>}   KEYS[2] rg:{dev:<hex id>}:nonce:<nonce hex>
-- ARGV[1] now_ms   ARGV[2] how long to remember the used nonce, ms (> 0)
-- ARGV[3] this request's attempt id (hex): the used nonce holds it, so a re-run of the
-- same request after its reply was lost is told 'attested' again, nothing changed.
-- Reply: {'attested'} | {'unknown'} | {'revoked'} | {'used'}
-- Both keys share the device's hash tag: one slot.
local status = redis.call('HGET', KEYS[1], 'status')
if not status then
  return {'unknown'}
end
if status == 'revoked' then
  return {'revoked'}
end
if not redis.call('SET', KEYS[2], ARGV[3], 'NX', 'PX', ARGV[2]) then
  if redis.call('GET', KEYS[2]) == ARGV[3] then
    return {'attested'}
  end
  return {'used'}
end
redis.call('HSET', KEYS[1], 'attested_ms', ARGV[1])
redis.call('HINCRBY', KEYS[1], 'attestations', 1)
return {'attested'}
