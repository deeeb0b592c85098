-- Count each queue's jobs by state.
-- KEYS: none.
-- ARGV[1]: P; ARGV[2..]: queue names.
-- Returns {now_us, then per queue: pending, delayed, reserved, done, failed,
--   oldest_us (of the oldest due job) or '', paused (0|1)}.
local now = now_us()
local out = {us(now)}
for i = 2, #ARGV do
  local q = ARGV[i]
  local dk, pk = qk(q, 'delayed'), qk(q, 'pending')
  local due = redis.call('ZCOUNT', dk, '-inf', us(now))
  local oldest = nil
  local head = redis.call('LINDEX', pk, 0)
  if head then oldest = tonumber(redis.call('HGET', ik(head), 'avail')) end
  local first = redis.call('ZRANGEBYSCORE', dk, '-inf', us(now), 'WITHSCORES', 'LIMIT', 0, 1)
  if #first > 0 and (not oldest or tonumber(first[2]) < oldest) then oldest = tonumber(first[2]) end
  table.insert(out, redis.call('LLEN', pk) + due)
  table.insert(out, redis.call('ZCARD', dk) - due)
  table.insert(out, redis.call('ZCARD', qk(q, 'reserved')))
  table.insert(out, redis.call('ZCARD', qk(q, 'done')))
  table.insert(out, redis.call('ZCARD', qk(q, 'failed')))
  table.insert(out, oldest and us(oldest) or '')
  table.insert(out, redis.call('SISMEMBER', P .. ':paused', q))
end
return out
