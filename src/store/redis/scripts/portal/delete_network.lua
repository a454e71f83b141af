#!lua
-- delete_network (the portal's layout): a network, its passphrases, its node set and
-- the nodes in it. The caller read the members first and declares their hashes; a
-- node that joined meanwhile makes the script refuse, and the caller reads again. A
-- member whose hash names another network (the portal leaves a node that moved in
-- its old set) stays.
-- KEYS[1] network:<id>   KEYS[2] …:passphrases   KEYS[3] …:passphraseNames   KEYS[4] …:nodes
-- KEYS[5] user:<username>:networks   KEYS[6..] node:<uuid>, one per member
-- ARGV[1] network id   ARGV[2..] the members read
-- Reply: {'unknown'} | {'changed'} | {'ok', nodes deleted}
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'unknown'}
end
local members = redis.call('SMEMBERS', KEYS[4])
if #members ~= #ARGV - 1 then
  return {'changed'}
end
local read = {}
for i = 2, #ARGV do
  read[ARGV[i]] = true
end
for _, member in ipairs(members) do
  if not read[member] then
    return {'changed'}
  end
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
local deleted = 0
for i = 6, #KEYS do
  if redis.call('HGET', KEYS[i], 'networkId') == ARGV[1] then
    redis.call('DEL', KEYS[i])
    deleted = deleted + 1
  end
end
redis.call('SREM', KEYS[5], ARGV[1])
return {'ok', tostring(deleted)}
