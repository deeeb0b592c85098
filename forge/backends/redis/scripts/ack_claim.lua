-- Acknowledge a claim (finish's 'done') and claim the next job, in one step: a worker draining
-- a queue makes one round trip per job. The claim is made whether or not the ack held.
-- KEYS: none.
-- ARGV[1]: P; ARGV[2]: id; ARGV[3]: token; ARGV[4]: the done event line; ARGV[5]: attempts;
--   ARGV[6]: keep_done ('1': keep done jobs for the retention); ARGV[7..12]: claim's ARGV[2..7]
--   (worker, new token, default_timeout_us, grace_us, margin_us, window_us); ARGV[13..]: queues.
-- Returns {acked (1|0), then claim's reply}.
local now = now_us()
local acked = finish_job(now, ARGV[2], ARGV[3], 'done', ARGV[4], ARGV[5], 0, ARGV[6], '0')
local reply = claim_next(now, ARGV[7], ARGV[8], tonumber(ARGV[9]), tonumber(ARGV[10]),
                         tonumber(ARGV[11]), tonumber(ARGV[12]), ARGV, 13)
table.insert(reply, 1, acked)
return reply
