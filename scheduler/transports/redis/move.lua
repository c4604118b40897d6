-- The mover: due timers of one shard go from its sorted set into its stream, in one atomic step.
--
-- Scripts run one at a time, so a member is either still in the set or already in the stream, never
-- both and never neither: any number of workers may run this at once without duplicating or losing
-- a timer. The count bounds how long one call holds the server.
--
-- KEYS[1]  timers: sorted set, member = order id, score = due time in epoch ms
-- KEYS[2]  due stream, read by the workers' consumer group
-- ARGV[1]  now, epoch ms (the caller's clock, the same one the registry claims with)
-- ARGV[2]  most timers to move in this call
-- ARGV[3]  stream field that carries the JSON message
-- ARGV[4]  the deployment's identity, carried by every message ("" for none)
-- returns  {timers moved, score of the earliest timer left (false when none)}

local due = redis.call('ZRANGE', KEYS[1], '-inf', ARGV[1], 'BYSCORE', 'LIMIT', 0, tonumber(ARGV[2]), 'WITHSCORES')
local moved = {}
local deployment = ''
if ARGV[4] ~= '' then
  deployment = ',"deployment":' .. cjson.encode(ARGV[4])
end
for i = 1, #due, 2 do
  -- The set holds only the id: the registry is authoritative for the version, so it travels as 0.
  local body = '{"order_id":' .. cjson.encode(due[i]) .. ',"due_ms":' .. due[i + 1] .. ',"version":0' .. deployment .. '}'
  redis.call('XADD', KEYS[2], '*', ARGV[3], body)
  moved[#moved + 1] = due[i]
end
if #moved > 0 then
  redis.call('ZREM', KEYS[1], unpack(moved))
end
local head = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {#moved, head[2] or false}
