-- Take up to ARGV[1] job ids off the queue the way RQ's workers dequeue (LMOVE into the queue's
-- intermediate list, rq >= 1.16), in one round trip instead of one per job, and read what the
-- worker needs of each job. Each LMOVE is atomic, so a job id taken here is in no rq worker's
-- hands; the caller then starts an execution of each (start.lua), which also takes the id off
-- the intermediate list, as RQ's worker does.
--
-- KEYS[1]  the queue (rq:queue:<queue>)
-- KEYS[2]  its intermediate list (rq:queue:<queue>:intermediate)
-- ARGV[1]  most job ids to take
-- ARGV[2]  prefix of job hash keys (rq:job:)
-- ARGV[3 ..]  ids the caller has already taken (a blocking LMOVE), to read as well
-- returns  per job id, oldest first, 4 values: the id, 1 when its hash exists (else 0), and the
--          hash's `data` and `meta` fields (nil when missing)

local taken = {}
for i = 3, #ARGV do
  taken[#taken + 1] = ARGV[i]
end
for _ = 1, tonumber(ARGV[1]) do
  local id = redis.call('LMOVE', KEYS[1], KEYS[2], 'LEFT', 'RIGHT')
  if not id then
    break
  end
  taken[#taken + 1] = id
end
local jobs = {}
for _, id in ipairs(taken) do
  local key = ARGV[2] .. id
  local fields = redis.call('HMGET', key, 'data', 'meta')
  jobs[#jobs + 1] = id
  jobs[#jobs + 1] = redis.call('EXISTS', key)
  jobs[#jobs + 1] = fields[1]
  jobs[#jobs + 1] = fields[2]
end
return jobs
