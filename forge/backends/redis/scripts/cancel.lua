-- Fail a waiting (pending or delayed) job with reason cancelled, in one step: off its queue,
-- its unique key freed, into failed.
-- KEYS: none.
-- ARGV[1]: P; ARGV[2]: id; ARGV[3]: the failed event's line.
-- Returns {'ok', state it was in} or {'no', its state or ''}.
local id = ARGV[2]
local info = redis.call('HMGET', ik(id), 'state', 'queue')
local st, q = info[1], info[2]
if st ~= 'pending' and st ~= 'delayed' then return {'no', st or ''} end
if st == 'pending' then
  if redis.call('LREM', qk(q, 'pending'), 1, id) == 0 then return {'no', st} end
else
  if redis.call('ZREM', qk(q, 'delayed'), id) == 0 then return {'no', st} end
end
local now = now_us()
redis.call('APPEND', jk(id), ARGV[3])
free_unique(id)
redis.call('ZADD', qk(q, 'failed'), us(now), id)
redis.call('HSET', ik(id), 'state', 'failed', 'at', us(now))
return {'ok', st}
