#!lua
-- delete_network: remove a network, its passphrases, and its nodes' records and
-- memberships. The caller read the members first and declares their records; a node
-- that joined meanwhile makes the script refuse, and the caller reads again.
-- KEYS[1] rg:{own:<o>}:net:<id>   KEYS[2] …:net:<id>:pp   KEYS[3] …:net:<id>:ppnames
-- KEYS[4] rg:{own:<o>}:nodes   KEYS[5..] rg:{own:<o>}:node:<uuid>, one per member
-- ARGV[1] the lower bound of the network's members in KEYS[4] ('[<id>\0')
-- ARGV[2] the upper bound ('(<id>\1')   ARGV[3..] the members read ('<id>\0<uuid>')
-- Reply: {'unknown'} | {'changed'} | {'ok'}
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'unknown'}
end
local members = redis.call('ZRANGEBYLEX', KEYS[4], ARGV[1], ARGV[2])
if #members ~= #ARGV - 2 then
  return {'changed'}
end
local read = {}
for i = 3, #ARGV do
  read[ARGV[i]] = true
end
for _, member in ipairs(members) do
  if not read[member] then
    return {'changed'}
  end
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
for i = 5, #KEYS do
  redis.call('DEL', KEYS[i])
end
redis.call('ZREMRANGEBYLEX', KEYS[4], ARGV[1], ARGV[2])
return {'ok'}
