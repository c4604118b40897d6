-- End RQ executions for a batch: what RQ's worker does after a job (`Execution.delete`), for every
-- job of the batch in one call. A job that is done is then deleted, as RQ deletes a successful job
-- with result_ttl 0, unless it has been scheduled again while it ran (a reschedule, a replay): its
-- hash then stays, status scheduled, for its next run.
--
-- KEYS[1]  the queue's StartedJobRegistry (rq:wip:<queue>)
-- KEYS[2]  the queue's ScheduledJobRegistry (rq:scheduled:<queue>)
-- ARGV[1]  prefix of job hash keys (rq:job:)
-- ARGV[2]  prefix of execution hash keys (rq:execution:)
-- ARGV[3]  prefix of a job's ExecutionRegistry keys (rq:executions:)
-- ARGV[4]  the worker's set of executions (rq:worker:<name>:executions, RQ 3), '' where RQ has none
-- then per job, 3 values: job id, execution id, '1' when the job is done, else '0'
-- returns  the number of jobs deleted

local deleted = 0
for i = 5, #ARGV, 3 do
  local id, execution = ARGV[i], ARGV[i + 1]
  local executions = ARGV[3] .. id
  redis.call('DEL', ARGV[2] .. id .. ':' .. execution)
  redis.call('ZREM', KEYS[1], id .. ':' .. execution)
  redis.call('ZREM', executions, execution)
  if ARGV[4] ~= '' then
    redis.call('SREM', ARGV[4], id .. ':' .. execution)
  end
  if ARGV[i + 2] == '1' then
    if redis.call('ZSCORE', KEYS[2], id) then
      redis.call('HSET', ARGV[1] .. id, 'status', 'scheduled')
    else
      redis.call('DEL', ARGV[1] .. id, executions)
      deleted = deleted + 1
    end
  end
end
return deleted
