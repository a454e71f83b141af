#!lua
-- add_passphrases: add a batch of pending passphrases, all or none.
-- KEYS[1] rg:{own:<o>}:net:<id>   KEYS[2] …:net:<id>:pp   KEYS[3] …:net:<id>:ppnames
-- ARGV[1] created_ms, then one triple per passphrase:
--   hash (64 lowercase hex), expires_ms (decimal, or '' for never), node_name
-- Reply: {'ok'} | {'unknown_network'} | {'name_taken', node_name} | {'passphrase_taken'}
-- Every check runs before the first write, so a refused batch leaves no trace.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'unknown_network'}
end
local names, hashes = {}, {}
for i = 2, #ARGV, 3 do
  local hash, name = ARGV[i], ARGV[i + 2]
  if names[name] or redis.call('HEXISTS', KEYS[3], name) == 1 then
    return {'name_taken', name}
  end
  if hashes[hash] or redis.call('HEXISTS', KEYS[2], hash) == 1 then
    return {'passphrase_taken'}
  end
  names[name] = true
  hashes[hash] = true
end
for i = 2, #ARGV, 3 do
  local hash, name = ARGV[i], ARGV[i + 2]
  -- Built from the argument strings: no Lua number ever reaches the store.
  redis.call('HSET', KEYS[2], hash, ARGV[1] .. '|' .. ARGV[i + 1] .. '|' .. name)
  redis.call('HSET', KEYS[3], name, hash)
end
return {'ok'}
