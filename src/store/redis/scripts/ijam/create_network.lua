#!lua
-- create_network: add a network's record in its owner's slot, unless it exists there.
-- The id's uniqueness across owners is claimed first, outside, on rg:{net:<id>}.
-- KEYS[1] rg:{own:<owner>}:net:<id>   KEYS[2] rg:{own:<owner>}:minted
-- ARGV[1] name   ARGV[2] created_ms   ARGV[3] re-registration rule ('owner' or 'minted')
-- ARGV[4] the network id
-- Reply: {'ok'} | {'exists'}
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {'exists'}
end
redis.call('HSET', KEYS[1], 'name', ARGV[1], 'created_ms', ARGV[2], 'reregistration', ARGV[3])
-- Set either way: an entry left by a deleted network of the same id goes.
if ARGV[3] == 'minted' then
  redis.call('SADD', KEYS[2], ARGV[4])
else
  redis.call('SREM', KEYS[2], ARGV[4])
end
return {'ok'}
