-- Arm timers as RQ scheduled jobs, many per call: what `Job.create(...).save()` plus the scheduled
-- registry's ZADD do for each, without a Python Job object and ~45 packed arguments per timer.
--
-- Each job hash is written afresh (a replayed job's hash still has its exc_info, its meta and the
-- failure TTL), leaves the failed registry and enters the scheduled registry at its due time. The
-- fields every job shares go once into a scratch hash, which COPY ... REPLACE then copies whole to
-- each job before its own two fields are set: one copy of a compact hash costs Redis much less than
-- 18 fields written one by one. A Redis without COPY (before 6.2) gets each job's fields written
-- one by one. The queue is listed in RQ's set of queues, as `Queue.enqueue` lists it (`rq info`
-- reads that set).
--
-- KEYS[1]  scheduled registry (rq:scheduled:<queue>)
-- KEYS[2]  failed registry (rq:failed:<queue>)
-- KEYS[3]  RQ's set of queues (rq:queues)
-- KEYS[4]  the scratch hash: written and deleted within the call
-- ARGV[1]  the queue's key (rq:queue:<queue>), the member of rq:queues
-- ARGV[2]  prefix of job hash keys (rq:job:)
-- ARGV[3]  n: the number of fields every job hash shares
-- ARGV[4 .. 3 + 2n]  those fields and their values (status, origin, timeout, retries, created_at, ...)
-- then per job, 4 values: job id, score (due time, epoch seconds), data, description
-- returns  the number of jobs armed

redis.call('SADD', KEYS[3], ARGV[1])
local shared = tonumber(ARGV[3])
local fields = {}
for i = 1, 2 * shared do
  fields[i] = ARGV[3 + i]
end
redis.call('DEL', KEYS[4])
redis.call('HSET', KEYS[4], unpack(fields))
local data_at = 2 * shared + 2
fields[data_at - 1] = 'data'
fields[data_at + 1] = 'description'
local copies = true
local armed = 0
for i = 4 + 2 * shared, #ARGV, 4 do
  local id = ARGV[i]
  local key = ARGV[2] .. id
  if copies then
    local copied = redis.pcall('COPY', KEYS[4], key, 'REPLACE')
    copies = type(copied) ~= 'table' or not copied.err
  end
  if copies then
    redis.call('HSET', key, 'data', ARGV[i + 2], 'description', ARGV[i + 3])
  else
    fields[data_at] = ARGV[i + 2]
    fields[data_at + 2] = ARGV[i + 3]
    redis.call('DEL', key)
    redis.call('HSET', key, unpack(fields))
  end
  redis.call('ZREM', KEYS[2], id)
  redis.call('ZADD', KEYS[1], ARGV[i + 1], id)
  armed = armed + 1
end
redis.call('DEL', KEYS[4])
return armed
