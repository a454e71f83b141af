#!lua
-- import_node: write a node as it stands (registrar migrate), unless its id is taken.
-- KEYS[1] rg:{own:<o>}:net:<id>   KEYS[2] rg:{own:<o>}:nodes   KEYS[3] rg:{own:<o>}:node:<uuid>
-- ARGV[1] network id   ARGV[2] node id   ARGV[3..] field, value, … of the node record
-- Reply: {'ok'} | {'unknown_network'} | {'exists'}
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'unknown_network'}
end
if redis.call('EXISTS', KEYS[3]) == 1 then
  return {'exists'}
end
local fields = {}
for i = 3, #ARGV do
  fields[#fields + 1] = ARGV[i]
end
redis.call('HSET', KEYS[3], unpack(fields))
redis.call('ZADD', KEYS[2], 0, ARGV[1] .. '\0' .. ARGV[2])
return {'ok'}
