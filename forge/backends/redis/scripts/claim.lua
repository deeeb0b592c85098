-- Claim the first due job of the first unpaused queue that has one, fenced by a token.
-- KEYS: none.
-- ARGV[1]: P; ARGV[2]: worker (a JSON string); ARGV[3]: token; ARGV[4]: default_timeout_us;
--   ARGV[5]: grace_us; ARGV[6]: margin_us; ARGV[7]: window_us; ARGV[8..]: queue names.
-- Returns {now_us} when nothing is due, else {now_us, id, record, attempt, deadline_us, lease_us}.
return claim_next(now_us(), ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5]),
                  tonumber(ARGV[6]), tonumber(ARGV[7]), ARGV, 8)
