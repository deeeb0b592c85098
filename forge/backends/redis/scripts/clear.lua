-- Delete up to n waiting jobs of a queue: pending first, then delayed.
-- KEYS: none.
-- ARGV[1]: P; ARGV[2]: queue; ARGV[3]: n.
-- Returns {deleted, taken}; taken < n means the queue had no more waiting jobs.
local q, n = ARGV[2], tonumber(ARGV[3])
local pk, dk = qk(q, 'pending'), qk(q, 'delayed')
local ids = redis.call('LRANGE', pk, 0, n - 1)
if #ids > 0 then redis.call('LTRIM', pk, #ids, -1) end
if #ids < n then
  for _, id in ipairs(redis.call('ZRANGE', dk, 0, n - #ids - 1)) do
    redis.call('ZREM', dk, id)
    table.insert(ids, id)
  end
end
local deleted = 0
for _, id in ipairs(ids) do
  local st = redis.call('HGET', ik(id), 'state')
  if st == 'pending' or st == 'delayed' then
    free_unique(id)
    drop(id)
    deleted = deleted + 1
  end
end
return {deleted, #ids}
