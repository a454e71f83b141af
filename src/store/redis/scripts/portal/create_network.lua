#!lua
-- create_network (the portal's layout): a network hash and its owner's network set,
-- as the portal's web pages write them.
-- KEYS[1] network:<id>   KEYS[2] user:<username>:networks
-- ARGV[1] network id   ARGV[2] name   ARGV[3] createdOn (ms)   ARGV[4] username
-- Reply: {'ok'} | {'exists'}
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {'exists'}
end
redis.call('HSET', KEYS[1], 'name', ARGV[2], 'createdOn', ARGV[3], 'username', ARGV[4])
redis.call('SADD', KEYS[2], ARGV[1])
return {'ok'}
