-- Take over stream entries that another consumer has held unacked for longer than the idle timeout
-- (it died, or hangs), together with how many times each has now been delivered: the handler
-- dead-letters an entry that keeps killing workers instead of passing it on forever.
--
-- KEYS[1]  due stream
-- ARGV[1]  consumer group
-- ARGV[2]  this consumer
-- ARGV[3]  idle timeout in ms
-- ARGV[4]  cursor: the stream id to scan the pending entries from ("0-0" to start over)
-- ARGV[5]  most entries to take
-- ARGV[6]  consumers silent this many ms with nothing pending are forgotten once a scan of the pending
--          entries is complete (0: never): each worker process that ever read leaves a consumer
--          name in the group, and one that died would otherwise stay there for good
-- returns  {next cursor, {{entry id, {field, value, ...}, deliveries}, ...}}

local claimed = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], 'COUNT', tonumber(ARGV[5]))
local taken = {}
for _, entry in ipairs(claimed[2]) do
  -- Redis 6.2 lists entries deleted from the stream as nil (7.0 drops them from the pending list).
  if entry then
    -- XAUTOCLAIM has just counted this delivery; XPENDING tells the total.
    local pending = redis.call('XPENDING', KEYS[1], ARGV[1], entry[1], entry[1], 1)
    local deliveries = 1
    if pending[1] then
      deliveries = pending[1][4]
    end
    taken[#taken + 1] = {entry[1], entry[2], deliveries}
  end
end
local forget_after = tonumber(ARGV[6])
if claimed[1] == '0-0' and forget_after > 0 then
  -- In the script, no consumer can take an entry between the look and the delete.
  for _, consumer in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
    local info = {}
    for i = 1, #consumer, 2 do
      info[consumer[i]] = consumer[i + 1]
    end
    if info['pending'] == 0 and info['idle'] > forget_after and info['name'] ~= ARGV[2] then
      redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info['name'])
    end
  end
end
return {claimed[1], taken}
