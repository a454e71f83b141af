#!lua
-- set_reregistration: change a network's re-registration rule.
-- KEYS[1] rg:{own:<owner>}:net:<id>   KEYS[2] rg:{own:<owner>}:minted
-- ARGV[1] the rule ('owner' or 'minted')   ARGV[2] the network id
-- Reply: {'ok'} | {'unknown'}
-- Checked first: HSET on a missing record would make a network with no name.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'unknown'}
end
redis.call('HSET', KEYS[1], 'reregistration', ARGV[1])
if ARGV[1] == 'minted' then
  redis.call('SADD', KEYS[2], ARGV[2])
else
  redis.call('SREM', KEYS[2], ARGV[2])
end
return {'ok'}
