-- Journal one attempt's outcome (forge/stats/redisjournal.py): the record appended to its
-- minute's string (which stops growing at ARGV[4] bytes and expires after ARGV[5] seconds),
-- and the running totals. With a job id it records only while the job is reserved under the
-- claim's token ARGV[12]. Run with an outcome in one script (lua.Joined, for
-- forge/stats/redisjournal.py), it runs after `finish` or `ack_claim`, unconditionally, and only
-- if the claim held: exactly when the outcome took effect.
-- KEYS: none.
-- ARGV[1]: P; ARGV[2]: minute (Unix time // 60); ARGV[3]: the record line; ARGV[4]: cap (bytes);
--   ARGV[5]: ttl seconds; ARGV[6]: totals field of the outcome ('<queue>|done');
--   ARGV[7], ARGV[8]: wait bucket field and wait seconds, or '' and '';
--   ARGV[9], ARGV[10]: runtime bucket field and runtime seconds, or '' and '';
--   ARGV[11]: the job id, or '' to record unconditionally; ARGV[12]: the claim's token.
-- Its writes use pcall: a journal that cannot be written (a key of another type) never stops
-- the finish it goes with. Returns 1 if recorded, else 0.
if ARGV[11] ~= '' then
  local info = redis.call('HMGET', ik(ARGV[11]), 'state', 'token')
  if info[1] ~= 'reserved' or info[2] ~= ARGV[12] then return 0 end
end
local mk = P .. ':stats:m:' .. ARGV[2]
local tk = P .. ':stats:totals'
local len = redis.pcall('STRLEN', mk)
if type(len) == 'number' and len + #ARGV[3] <= tonumber(ARGV[4]) then
  redis.pcall('APPEND', mk, ARGV[3])
  if len == 0 then redis.pcall('EXPIRE', mk, ARGV[5]) end  -- the minute's first record
end
redis.pcall('HINCRBY', tk, ARGV[6], 1)
for i = 7, 9, 2 do
  if ARGV[i] ~= '' then
    redis.pcall('HINCRBY', tk, ARGV[i], 1)
    redis.pcall('HINCRBYFLOAT', tk, string.match(ARGV[i], '^(.*|)') .. 'sum', ARGV[i + 1])
  end
end
return 1
