-- End a claim: done (ack), release (back to the queue after a delay) or failed.
-- KEYS: none.
-- ARGV[1]: P; ARGV[2]: id; ARGV[3]: token; ARGV[4]: mode (done|release|failed);
--   ARGV[5]: event line or ''; ARGV[6]: attempts; ARGV[7]: delay_us; ARGV[8]: keep_done
--   ('1': keep done jobs for the retention); ARGV[9]: only_expired ('1': only if the lease
--   has run out, for recovering abandoned claims).
-- Returns 1 if the claim held and was finished, else 0.
return finish_job(now_us(), ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[7]), ARGV[8],
                  ARGV[9])
