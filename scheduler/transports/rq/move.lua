-- The mover of the `rq` transport: due jobs of the scheduled registry go onto the queue, atomically.
--
-- It does what RQ's scheduler does (ZRANGEBYSCORE, enqueue, remove) in one step, so any number of
-- our workers may run it at once without pushing a job twice. RQ's scheduler is not atomic: it
-- reads, then enqueues and removes while it holds the queue's scheduler lock. So while that lock
-- exists (a `rq worker --with-scheduler` owns the queue) this script moves nothing and leaves the
-- job to that scheduler, which would otherwise push a job that we have moved a second time.
--
-- KEYS[1]  scheduled registry (rq:scheduled:<queue>): member = job id, score = due time, epoch s
-- KEYS[2]  the queue (rq:queue:<queue>)
-- KEYS[3]  RQ's scheduler lock of the queue (rq:scheduler-lock:<queue>)
-- ARGV[1]  now, epoch seconds with millisecond decimals
-- ARGV[2]  most jobs to move in this call
-- ARGV[3]  prefix of job hash keys (rq:job:)
-- ARGV[4]  enqueued_at in RQ's timestamp format
-- returns  {jobs moved, or -1 when an RQ scheduler holds the queue; earliest score left (false when none)}

if redis.call('EXISTS', KEYS[3]) == 1 then
  local head = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {-1, head[2] or false}
end
local due = redis.call('ZRANGE', KEYS[1], '-inf', ARGV[1], 'BYSCORE', 'LIMIT', 0, tonumber(ARGV[2]))
local moved = 0
for _, id in ipairs(due) do
  redis.call('ZREM', KEYS[1], id)
  local key = ARGV[3] .. id
  -- A job whose hash has gone (deleted by hand, expired) is dropped, as RQ's scheduler drops it.
  if redis.call('EXISTS', key) == 1 then
    redis.call('HSET', key, 'status', 'queued', 'enqueued_at', ARGV[4])
    redis.call('RPUSH', KEYS[2], id)
    moved = moved + 1
  end
end
local head = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {moved, head[2] or false}
