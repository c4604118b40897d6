-- Start RQ executions for a batch of jobs our Worker has taken: what RQ's worker does before it
-- runs a job (`Execution.create` and `Job.prepare_for_execution`), for every job of the batch in
-- one call. Then the ids leave the queue's intermediate list, as RQ's worker removes a job it has
-- registered. A job whose hash has gone since it was taken (revoked) gets no execution.
--
-- KEYS[1]  the queue's StartedJobRegistry (rq:wip:<queue>)
-- KEYS[2]  the queue's intermediate list (rq:queue:<queue>:intermediate)
-- ARGV[1]  prefix of job hash keys (rq:job:)
-- ARGV[2]  prefix of execution hash keys (rq:execution:)
-- ARGV[3]  prefix of a job's ExecutionRegistry keys (rq:executions:)
-- ARGV[4]  now, epoch seconds (the execution's created_at and last_heartbeat)
-- ARGV[5]  the execution's lease, seconds (TTL of its hash)
-- ARGV[6]  its StartedJobRegistry score (whole seconds now + lease)
-- ARGV[7]  its ExecutionRegistry score (that + 60)
-- ARGV[8]  the ExecutionRegistry's TTL (lease + 60)
-- ARGV[9]  now in RQ's timestamp format (the job's started_at and last_heartbeat)
-- ARGV[10] the worker's name
-- ARGV[11] the worker's set of executions (rq:worker:<name>:executions, RQ 3), '' where RQ has none
-- ARGV[12] '1' when the execution hash names its job (a job_id field, RQ 3), else '0'
-- ARGV[13] n: the number of ids to take off the intermediate list only (not ours to run)
-- ARGV[14 .. 13 + n]  those ids
-- then per job to start, 3 values: job id, execution id, the job's meta (JSON)
-- returns  the ids of the jobs started

local started = {}
local first = 14 + tonumber(ARGV[13])
for i = 14, first - 1 do
  redis.call('LREM', KEYS[2], 1, ARGV[i])
end
for i = first, #ARGV, 3 do
  local id, execution = ARGV[i], ARGV[i + 1]
  local job = ARGV[1] .. id
  if redis.call('EXISTS', job) == 1 then
    local key = ARGV[2] .. id .. ':' .. execution
    redis.call('HSET', key, 'id', execution, 'created_at', ARGV[4], 'last_heartbeat', ARGV[4], 'worker_name', ARGV[10])
    if ARGV[12] == '1' then
      redis.call('HSET', key, 'job_id', id)
    end
    redis.call('EXPIRE', key, ARGV[5])
    local executions = ARGV[3] .. id
    redis.call('ZADD', executions, ARGV[7], execution)
    redis.call('EXPIRE', executions, ARGV[8])
    redis.call('ZADD', KEYS[1], ARGV[6], id .. ':' .. execution)
    if ARGV[11] ~= '' then
      redis.call('SADD', ARGV[11], id .. ':' .. execution)
      redis.call('EXPIRE', ARGV[11], ARGV[8])
    end
    redis.call('HSET', job, 'last_heartbeat', ARGV[9], 'status', 'started', 'started_at', ARGV[9],
      'worker_name', ARGV[10], 'meta', ARGV[i + 2])
    started[#started + 1] = id
  end
  redis.call('LREM', KEYS[2], 1, id)
end
return started
