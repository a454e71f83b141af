#!lua
-- register (the portal's layout): consume a passphrase and write the node, atomically,
-- the way the portal's registration server writes it (the node hash whole, added to
-- the network's node set), with a replay record of our own for byte-identical retries.
-- KEYS[1] network:<id>   KEYS[2] network:<id>:passphrases   KEYS[3] network:<id>:passphraseNames
-- KEYS[4] network:<id>:nodes   KEYS[5] registrar:replay:<id>:<replay key hex>
-- KEYS[6] node:<fresh id>   KEYS[7] node:<requested id> (absent when none)
-- KEYS[8] network:<old id>:nodes (when the requested node was read in another network)
-- ARGV[1] network id   ARGV[2] passphrase   ARGV[3] now_ms   ARGV[4] replay_ttl_ms
-- ARGV[5] fresh id   ARGV[6] requested id or ''   ARGV[7] encKey (hex)
-- ARGV[8] type   ARGV[9] arch (the portal's spelling)
-- ARGV[10] the requested node's networkId as the caller read it ('' when none)
-- Reply: {'replayed', id} | {'invalid'} | {'stale'} | {'created', id} | {'reregistered', id}
-- 'stale': the requested node moved since the caller read it; nothing was written.
local net_key, pp_key, names_key, nodes_key, replay_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local fresh_key, requested_key, old_nodes_key = KEYS[6], KEYS[7], KEYS[8]
local network, passphrase, now, ttl = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local fresh_id, requested_id, enc_key, node_type, arch, read_network =
  ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10]

-- 1. The network, and a byte-identical retry within the TTL.
local owner = redis.call('HGET', net_key, 'username')
if not owner then
  return {'invalid'}
end
local replayed = redis.call('GET', replay_key)
if replayed then
  return {'replayed', replayed}
end

-- 2. The passphrase: in the set and named, as the portal checks it.
if redis.call('SISMEMBER', pp_key, passphrase) == 0 then
  return {'invalid'}
end
local name = redis.call('HGET', names_key, passphrase)
if not name then
  return {'invalid'}
end

-- 3. Which node: the requested one when it is this owner's and not revoked (an
-- expired one registers again), created under the requested id when it does not
-- exist, else a fresh id.
local outcome, id, node_key = 'created', fresh_id, fresh_key
local old_network
if requested_key then
  local rec = redis.call('HMGET', requested_key, 'username', 'status', 'networkId')
  if not rec[1] then
    id, node_key = requested_id, requested_key
  elseif rec[1] == owner and rec[2] ~= 'revoked' then
    if (rec[3] or '') ~= read_network then
      return {'stale'}
    end
    outcome, id, node_key, old_network = 'reregistered', requested_id, requested_key, rec[3]
  end
end
if outcome == 'created' and redis.call('EXISTS', node_key) == 1 then
  return redis.error_reply('RGCORRUPT fresh node id already exists: ' .. node_key)
end

-- 4. Consume the passphrase, as the portal does.
redis.call('SREM', pp_key, passphrase)
redis.call('HDEL', names_key, passphrase)

-- 5. The node hash, whole, as the portal writes it; its network's node set.
redis.call('HSET', node_key, 'status', 'offline', 'name', name, 'type', node_type,
  'arch', arch, 'encKey', enc_key, 'ip', '', 'createdOn', now, 'lastRegisteredOn', now,
  'lastOnlineOn', '0', 'networkId', network, 'username', owner)
redis.call('SADD', nodes_key, id)
if old_network and old_network ~= network and old_nodes_key then
  redis.call('SREM', old_nodes_key, id)
end

-- 6. Remember the answer for retries.
if ttl and ttl > 0 then
  redis.call('SET', replay_key, id, 'PX', ARGV[4])
end
return {outcome, id}
