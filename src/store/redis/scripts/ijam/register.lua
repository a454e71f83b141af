#!lua
-- register: consume a passphrase and create or re-register a node, atomically. Every
-- key is in the owner's slot: the network's passphrases, the owner's nodes and the
-- replay record.
-- KEYS[1] rg:{own:<o>}:net:<id>   KEYS[2] …:net:<id>:pp   KEYS[3] …:net:<id>:ppnames
-- KEYS[4] rg:{own:<o>}:nodes      KEYS[5] …:net:<id>:replay:<replay key hex>
-- KEYS[6] rg:{own:<o>}:node:<fresh id>   KEYS[7] rg:{own:<o>}:node:<requested id> (absent when none)
-- KEYS[8] rg:{own:<o>}:minted (with KEYS[7]): the owner's networks under 'minted'
-- ARGV[1] network id   ARGV[2] passphrase hash hex   ARGV[3] now_ms   ARGV[4] replay_ttl_ms
-- ARGV[5] fresh id     ARGV[6] requested id or ''
-- ARGV[7] the node key sealed for the fresh id (hex)
-- ARGV[8] the node key sealed for the requested id (hex), or '' without a requested id
-- ARGV[9] node type    ARGV[10] arch   ARGV[11] owner
-- ARGV[12] where the node index puts the requested id: 'mine' (this owner), 'other'
--          (another owner), 'none' (nowhere), or '' without a requested id
-- Reply: {'no_network'} | {'replayed', id} | {'invalid'} | {'claim'} |
--        {'created', id} | {'reregistered', id}
-- 'claim': the passphrase is good and the requested id is nowhere: the caller claims
-- the id in the node index and runs the script again. Nothing was written.
-- 'invalid': no such passphrase, expired, minted for another use (a passphrase minted
-- for a node re-registers that node only: named, in this network, not revoked), or a
-- re-registration a rule refuses ('minted', of this network or of the network the node
-- is in: an existing node of the owner takes a passphrase minted for it). Nothing was
-- written.
-- Error: 'RGCORRUPT ...' when a stored record cannot be read, the fresh id is taken, or
-- no key was sealed for the id picked.
--
-- Every check runs before the first write (a Lua error does not roll back earlier
-- writes).
local net_key, pp_key, ppnames_key, nodes_key, replay_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local fresh_key, requested_key, minted_key = KEYS[6], KEYS[7], KEYS[8]
local network, pp_hash, now, ttl = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local fresh_id, requested_id, fresh_sealed, requested_sealed = ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local node_type, arch, owner, indexed = ARGV[9], ARGV[10], ARGV[11], ARGV[12]

-- 1. The network must be this owner's (the caller's network index may be stale), and
-- a byte-identical retry within the TTL gets the same answer.
if redis.call('EXISTS', net_key) == 0 then
  return {'no_network'}
end
local replayed = redis.call('GET', replay_key)
if replayed then
  return {'replayed', replayed}
end

-- 2. The passphrase must be pending in this network and not expired. One minted for a
-- node leads with 'for:<uuid>|'.
local entry = redis.call('HGET', pp_key, pp_hash)
if not entry then
  return {'invalid'}
end
local minted_for, rest = string.match(entry, '^for:([%x%-]+)|(.*)$')
local created, expires, name = string.match(rest or entry, '^(%-?%d+)|(%-?%d*)|(.*)$')
if not created then
  return redis.error_reply('RGCORRUPT passphrase entry in ' .. pp_key)
end
if expires ~= '' and tonumber(expires) <= tonumber(now) then
  return {'invalid'}
end

-- 3. Who may re-register: a passphrase minted for a node only that node, named, in
-- this network and not revoked; when this network or the node's own network is under
-- the rule 'minted' (a record from before the rules has none: 'owner'), no other
-- passphrase an existing node (else a spare passphrase of another network of the
-- owner would take it over, and move it out).
local rule = redis.call('HGET', net_key, 'reregistration') or 'owner'
if rule ~= 'owner' and rule ~= 'minted' then
  return redis.error_reply('RGCORRUPT re-registration rule of ' .. net_key)
end
local rec = {false, false}
if requested_key then
  rec = redis.call('HMGET', requested_key, 'status', 'network')
end
-- A record in this slot is the owner's node.
local reregisterable = rec[1] and rec[1] ~= 'revoked'
if minted_for then
  if minted_for ~= requested_id or not reregisterable or rec[2] ~= network then
    return {'invalid'}
  end
elseif reregisterable and (rule == 'minted'
    or (minted_key and redis.call('SISMEMBER', minted_key, rec[2] or '') == 1)) then
  return {'invalid'}
end

-- 4. (decided before any write) Re-register, create under the requested id, or fresh;
-- the node key kept is the one sealed for that id (bound to it).
local outcome, id, node_key, sealed = 'created', fresh_id, fresh_key, fresh_sealed
local old_network
if requested_key then
  if rec[1] then
    if rec[1] ~= 'revoked' then
      outcome, id, node_key, old_network = 'reregistered', requested_id, requested_key, rec[2]
      sealed = requested_sealed
      if not old_network then
        return redis.error_reply('RGCORRUPT node record ' .. requested_key)
      end
    end
  elseif indexed == 'mine' then
    id, node_key, sealed = requested_id, requested_key, requested_sealed
  elseif indexed == 'none' then
    return {'claim'}
  end
end
if outcome == 'created' and redis.call('EXISTS', node_key) == 1 then
  return redis.error_reply('RGCORRUPT fresh node id already exists: ' .. node_key)
end
if sealed == '' then
  return redis.error_reply('RGCORRUPT no node key sealed for ' .. id)
end

-- 5. Consume the passphrase.
redis.call('HDEL', pp_key, pp_hash)
if redis.call('HGET', ppnames_key, name) == pp_hash then
  redis.call('HDEL', ppnames_key, name)
end

-- 6. Write the node and its membership (members are '<network>\0<id>').
if outcome == 'reregistered' then
  redis.call('HSET', node_key, 'network', network, 'name', name, 'type', node_type,
    'arch', arch, 'status', 'offline', 'key', sealed, 'registered_ms', now)
  redis.call('ZREM', nodes_key, old_network .. '\0' .. id)
else
  redis.call('HSET', node_key, 'network', network, 'owner', owner, 'name', name,
    'type', node_type, 'arch', arch, 'status', 'offline', 'key', sealed, 'ip', '',
    'created_ms', now, 'registered_ms', now, 'online_ms', '0')
end
redis.call('ZADD', nodes_key, 0, network .. '\0' .. id)

-- 7. Remember the answer for retries.
if ttl and ttl > 0 then
  redis.call('SET', replay_key, id, 'PX', ARGV[4])
end
return {outcome, id}
