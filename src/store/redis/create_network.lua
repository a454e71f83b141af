-- create_network: add a network unless its id is taken.
-- KEYS[1] rg:{net:<id>}   KEYS[2] rg:networks (cross-slot: see schemas/redis-keys.md)
-- ARGV[1] id   ARGV[2] owner   ARGV[3] name   ARGV[4] created_ms
-- Reply: {'ok'} | {'exists'}
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {'exists'}
end
redis.call('HSET', KEYS[1], 'owner', ARGV[2], 'name', ARGV[3], 'created_ms', ARGV[4])
redis.call('SADD', KEYS[2], ARGV[1])
return {'ok'}
