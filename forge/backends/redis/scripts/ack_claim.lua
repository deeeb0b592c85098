-- Acknowledge a claim (finish's 'done') and claim the next job, in one step: a worker draining
-- a queue makes one round trip per job. The claim is made whether or not the ack held. Each
-- part is optional: a worker that claims ahead (forge/worker/supervisor.py) sends, right after
-- it handed a job to its job process, the last job's ack, that the job it holds ahead started,
-- and the claim of the next one, ahead.
-- KEYS: none.
-- ARGV[1]: P; ARGV[2]: id ('': no ack); ARGV[3]: token; ARGV[4]: the done event line;
--   ARGV[5]: attempts; ARGV[6]: keep_done ('1': keep done jobs for the retention);
--   ARGV[7]: started id ('': none), a claim made ahead whose job now runs: its ahead mark is
--   cleared if it still holds under ARGV[8], its token; ARGV[9]: the claim: '0' plain, '1'
--   ahead (claim_next's ahead), '' none; ARGV[10..15]: claim's ARGV[2..7] (worker, new token,
--   default_timeout_us, grace_us, margin_us, window_us); ARGV[16..]: queues.
-- Returns {acked (1|0), then claim's reply} ({acked, now_us} without a claim).
local now = now_us()
local acked = 0
if ARGV[2] ~= '' then
  acked = finish_job(now, ARGV[2], ARGV[3], 'done', ARGV[4], ARGV[5], 0, ARGV[6], '0')
end
if ARGV[7] ~= '' and redis.call('HGET', ik(ARGV[7]), 'ahead') == ARGV[8] then
  redis.call('HDEL', ik(ARGV[7]), 'ahead')
end
local reply = {us(now)}
if ARGV[9] ~= '' then
  reply = claim_next(now, ARGV[10], ARGV[11], tonumber(ARGV[12]), tonumber(ARGV[13]),
                     tonumber(ARGV[14]), tonumber(ARGV[15]), ARGV, 16, ARGV[9] == '1')
end
table.insert(reply, 1, acked)
return reply
