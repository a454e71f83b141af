#!lua
-- add_passphrases: add a batch of pending passphrases, all or none.
-- KEYS[1] rg:{own:<o>}:net:<id>   KEYS[2] …:net:<id>:pp   KEYS[3] …:net:<id>:ppnames
-- KEYS[4] rg:{own:<o>}:nodes
-- ARGV[1] created_ms   ARGV[2] network id, then one quadruple per passphrase:
--   hash (64 lowercase hex), expires_ms (decimal, or '' for never),
--   the node it is minted for (<uuid>, or '' for any use), node_name
-- Reply: {'ok'} | {'unknown_network'} | {'name_taken', node_name} | {'passphrase_taken'}
--        | {'not_in_network', uuid}
-- Every check runs before the first write, so a refused batch leaves no trace.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'unknown_network'}
end
local network = ARGV[2]
local names, hashes = {}, {}
for i = 3, #ARGV, 4 do
  local hash, for_node, name = ARGV[i], ARGV[i + 2], ARGV[i + 3]
  if names[name] or redis.call('HEXISTS', KEYS[3], name) == 1 then
    return {'name_taken', name}
  end
  if hashes[hash] or redis.call('HEXISTS', KEYS[2], hash) == 1 then
    return {'passphrase_taken'}
  end
  if for_node ~= '' and not redis.call('ZSCORE', KEYS[4], network .. '\0' .. for_node) then
    return {'not_in_network', for_node}
  end
  names[name] = true
  hashes[hash] = true
end
for i = 3, #ARGV, 4 do
  local hash, for_node, name = ARGV[i], ARGV[i + 2], ARGV[i + 3]
  -- Built from the argument strings: no Lua number ever reaches the store. A
  -- passphrase minted for a node leads with 'for:<uuid>|', which a release without
  -- the rule cannot parse: it refuses the entry rather than use it for any node.
  local entry = ARGV[1] .. '|' .. ARGV[i + 1] .. '|' .. name
  if for_node ~= '' then
    entry = 'for:' .. for_node .. '|' .. entry
  end
  redis.call('HSET', KEYS[2], hash, entry)
  redis.call('HSET', KEYS[3], name, hash)
end
return {'ok'}
