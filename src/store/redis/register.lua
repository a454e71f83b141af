-- register: consume a passphrase and create or re-register a node, atomically.
-- KEYS[1] rg:{net:<id>}            KEYS[2] rg:{net:<id>}:pp
-- KEYS[3] rg:{net:<id>}:ppnames    KEYS[4] rg:{net:<id>}:nodes
-- KEYS[5] rg:{net:<id>}:replay:<replay key hex>
-- KEYS[6] rg:{node:<fresh id>}     KEYS[7] rg:{node:<requested id>} (absent when none)
-- ARGV[1] network id   ARGV[2] passphrase hash hex   ARGV[3] now_ms   ARGV[4] replay_ttl_ms
-- ARGV[5] fresh id     ARGV[6] requested id or ''    ARGV[7] sealed key hex
-- ARGV[8] node type    ARGV[9] arch
-- Reply: {'replayed', id} | {'invalid'} | {'created', id} | {'reregistered', id}
-- Error: 'RGCORRUPT ...' when a stored record cannot be read or the fresh id is taken.
--
-- Every check runs before the first write (a Lua error does not roll back earlier
-- writes). Cross-slot: the node keys live in their own slots, and re-registering into
-- another network touches that network's node set, whose key is built here from the
-- node record (see schemas/redis-keys.md).
local net_key, pp_key, ppnames_key, nodes_key, replay_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local fresh_key, requested_key = KEYS[6], KEYS[7]
local network, pp_hash, now, ttl = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local fresh_id, requested_id, sealed, node_type, arch = ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9]

-- 1. The network must exist (a deleted one leaves replay records behind until they
-- expire), and a byte-identical retry within the TTL gets the same answer.
local owner = redis.call('HGET', net_key, 'owner')
if not owner then
  return {'invalid'}
end
local replayed = redis.call('GET', replay_key)
if replayed then
  return {'replayed', replayed}
end

-- 2. The passphrase must be pending in this network and not expired.
local entry = redis.call('HGET', pp_key, pp_hash)
if not entry then
  return {'invalid'}
end
local created, expires, name = string.match(entry, '^(%-?%d+)|(%-?%d*)|(.*)$')
if not created then
  return redis.error_reply('RGCORRUPT passphrase entry in ' .. pp_key)
end
if expires ~= '' and tonumber(expires) <= tonumber(now) then
  return {'invalid'}
end

-- 4. (decided before any write) Re-register, create under the requested id, or fresh.
local outcome, id, node_key = 'created', fresh_id, fresh_key
local old_network
if requested_key then
  local rec = redis.call('HMGET', requested_key, 'owner', 'status', 'network')
  if not rec[1] then
    id, node_key = requested_id, requested_key
  elseif rec[1] == owner and rec[2] ~= 'revoked' then
    outcome, id, node_key, old_network = 'reregistered', requested_id, requested_key, rec[3]
    if not old_network then
      return redis.error_reply('RGCORRUPT node record ' .. requested_key)
    end
  end
end
if outcome == 'created' and redis.call('EXISTS', node_key) == 1 then
  return redis.error_reply('RGCORRUPT fresh node id already exists: ' .. node_key)
end

-- 3. Consume the passphrase.
redis.call('HDEL', pp_key, pp_hash)
if redis.call('HGET', ppnames_key, name) == pp_hash then
  redis.call('HDEL', ppnames_key, name)
end

-- 4. Write the node.
if outcome == 'reregistered' then
  redis.call('HSET', node_key, 'network', network, 'name', name, 'type', node_type,
    'arch', arch, 'status', 'offline', 'key', sealed, 'registered_ms', now)
  if old_network ~= network then
    redis.call('SREM', 'rg:{net:' .. old_network .. '}:nodes', id)
  end
  redis.call('SADD', nodes_key, id)
else
  redis.call('HSET', node_key, 'network', network, 'owner', owner, 'name', name,
    'type', node_type, 'arch', arch, 'status', 'offline', 'key', sealed, 'ip', '',
    'created_ms', now, 'registered_ms', now, 'online_ms', '0')
  redis.call('SADD', nodes_key, id)
end

-- 5. Remember the answer for retries.
if ttl and ttl > 0 then
  redis.call('SET', replay_key, id, 'PX', ARGV[4])
end
return {outcome, id}
