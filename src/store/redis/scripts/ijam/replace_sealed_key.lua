#!lua
-- replace_sealed_key: a node's sealed key re-sealed (registrar serve, at start), only
-- while the record still holds the value the caller read: a registration that re-keyed
-- the node meanwhile keeps its key.
-- KEYS[1] rg:{own:<o>}:node:<uuid>
-- ARGV[1] the sealed key (hex) as the caller read it   ARGV[2] its replacement (hex)
-- Reply: {'replaced'} | {'changed'} (also: no such record, or its key erased: it stays so)
local held = redis.call('HGET', KEYS[1], 'key')
if not held or held == '' or held ~= ARGV[1] then
  return {'changed'}
end
redis.call('HSET', KEYS[1], 'key', ARGV[2])
return {'replaced'}
