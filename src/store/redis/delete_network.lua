-- delete_network: remove a network, its passphrases and its node set; the caller
-- deletes the node records (each in a slot of its own) from the ids returned.
-- KEYS[1] rg:{net:<id>}   KEYS[2] rg:{net:<id>}:pp   KEYS[3] rg:{net:<id>}:ppnames
-- KEYS[4] rg:{net:<id>}:nodes   KEYS[5] rg:networks (cross-slot: see schemas/redis-keys.md)
-- ARGV[1] network id
-- Reply: {'unknown'} | {'ok', node id, ...}
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'unknown'}
end
local nodes = redis.call('SMEMBERS', KEYS[4])
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
redis.call('SREM', KEYS[5], ARGV[1])
local reply = {'ok'}
for _, id in ipairs(nodes) do
  reply[#reply + 1] = id
end
return reply
