-- Append captured output to a job's log, capped.
-- KEYS: none.
-- ARGV[1]: P; ARGV[2]: id; ARGV[3]: data; ARGV[4]: cap (bytes).
-- Returns 0.
local k = P .. ':log:' .. ARGV[2]
local room = tonumber(ARGV[4]) - redis.call('STRLEN', k)
if room > 0 then redis.call('APPEND', k, string.sub(ARGV[3], 1, room)) end
return 0
