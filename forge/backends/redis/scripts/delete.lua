-- Delete jobs that are (still) in the given state.
-- KEYS: none.
-- ARGV[1]: P; ARGV[2]: state (failed|done); ARGV[3..]: ids.
-- Returns how many were deleted.
local n = 0
for i = 3, #ARGV do
  local id = ARGV[i]
  local info = redis.call('HMGET', ik(id), 'state', 'queue')
  if info[1] == ARGV[2] then
    redis.call('ZREM', qk(info[2], ARGV[2]), id)
    drop(id)
    n = n + 1
  end
end
return n
