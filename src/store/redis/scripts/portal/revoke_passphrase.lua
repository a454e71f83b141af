#!lua
-- revoke_passphrase (the portal's layout): drop the pending passphrase of a node name.
-- KEYS[1] network:<id>   KEYS[2] network:<id>:passphrases   KEYS[3] network:<id>:passphraseNames
-- ARGV[1] node name
-- Reply: {'ok'} | {'unknown_network'} | {'unknown_name'}
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'unknown_network'}
end
local entries = redis.call('HGETALL', KEYS[3])
for i = 1, #entries, 2 do
  if entries[i + 1] == ARGV[1] then
    redis.call('SREM', KEYS[2], entries[i])
    redis.call('HDEL', KEYS[3], entries[i])
    return {'ok'}
  end
end
return {'unknown_name'}
