#!lua
-- revoke_passphrase: drop the pending passphrase of one node name.
-- KEYS[1] rg:{own:<o>}:net:<id>   KEYS[2] …:net:<id>:pp   KEYS[3] …:net:<id>:ppnames
-- ARGV[1] node_name
-- Reply: {'ok'} | {'unknown_network'} | {'unknown_name'}
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'unknown_network'}
end
local hash = redis.call('HGET', KEYS[3], ARGV[1])
if not hash then
  return {'unknown_name'}
end
redis.call('HDEL', KEYS[2], hash)
redis.call('HDEL', KEYS[3], ARGV[1])
return {'ok'}
