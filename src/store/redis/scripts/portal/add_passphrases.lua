#!lua
-- add_passphrases (the portal's layout): passphrases as typed, each with its node name,
-- all or none. Node names are unique among a network's pending passphrases (revoking
-- goes by name).
-- KEYS[1] network:<id>   KEYS[2] network:<id>:passphrases   KEYS[3] network:<id>:passphraseNames
-- ARGV: passphrase, node name, passphrase, node name, …
-- Reply: {'ok'} | {'unknown_network'} | {'name_taken', name} | {'passphrase_taken'}
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'unknown_network'}
end
local names = {}
for _, name in ipairs(redis.call('HVALS', KEYS[3])) do
  names[name] = true
end
local batch = {}
for i = 1, #ARGV, 2 do
  local passphrase, name = ARGV[i], ARGV[i + 1]
  if names[name] then
    return {'name_taken', name}
  end
  if batch[passphrase] or redis.call('SISMEMBER', KEYS[2], passphrase) == 1 then
    return {'passphrase_taken'}
  end
  names[name] = true
  batch[passphrase] = true
end
for i = 1, #ARGV, 2 do
  redis.call('SADD', KEYS[2], ARGV[i])
  redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1])
end
return {'ok'}
