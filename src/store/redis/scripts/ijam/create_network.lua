#!lua
-- create_network: add a network's record in its owner's slot, unless it exists there.
-- The id's uniqueness across owners is claimed first, outside, on rg:{net:<id>}.
-- KEYS[1] rg:{own:<owner>}:net:<id>
-- ARGV[1] name   ARGV[2] created_ms   ARGV[3] re-registration rule ('owner' or 'minted')
-- Reply: {'ok'} | {'exists'}
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {'exists'}
end
redis.call('HSET', KEYS[1], 'name', ARGV[1], 'created_ms', ARGV[2], 'reregistration', ARGV[3])
return {'ok'}
