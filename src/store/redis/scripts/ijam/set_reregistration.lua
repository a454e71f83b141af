#!lua
-- set_reregistration: change a network's re-registration rule.
-- KEYS[1] rg:{own:<owner>}:net:<id>
-- ARGV[1] the rule ('owner' or 'minted')
-- Reply: {'ok'} | {'unknown'}
-- Checked first: HSET on a missing record would make a network with no name.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'unknown'}
end
redis.call('HSET', KEYS[1], 'reregistration', ARGV[1])
return {'ok'}
