-- Take up to ARGV[1] job ids off the queue the way RQ's workers dequeue (LMOVE into the queue's
-- intermediate list, rq >= 1.16), in one round trip instead of one per job. Each LMOVE is atomic,
-- so a job id taken here is in no rq worker's hands; the caller then registers an execution in the
-- StartedJobRegistry and removes the id from the intermediate list, as RQ's worker does.
--
-- KEYS[1]  the queue (rq:queue:<queue>)
-- KEYS[2]  its intermediate list (rq:queue:<queue>:intermediate)
-- ARGV[1]  most job ids to take
-- returns  the job ids taken, oldest first

local taken = {}
for _ = 1, tonumber(ARGV[1]) do
  local id = redis.call('LMOVE', KEYS[1], KEYS[2], 'LEFT', 'RIGHT')
  if not id then
    break
  end
  taken[#taken + 1] = id
end
return taken
