-- Store and enqueue a batch of jobs, all or none: a unique key held by a waiting or running
-- job (or twice in the batch) refuses the whole batch. A job whose id exists already (an id
-- derived from an idempotency key, in any state; or a retried push) is skipped, unique key
-- unchecked, so running it again stores nothing twice.
-- KEYS: none.
-- ARGV[1]: P; ARGV[2]: n, the number of jobs; then 7 per job: id, queue, record (the job's
--   JSON line), due_us (server clock; 0: due now), timeout_us or '', ukey (hashed unique key)
--   or '', ttl_ms (of the unique key) or ''.
-- Returns {'dup', ukey, holder id} or {'ok', stored, flags}: flags has one character per job,
--   '1' if it was stored, '0' if its id existed (or came earlier in the batch).
local n = tonumber(ARGV[2])
local seen = {}
local fresh = {}
local ids = {}
for i = 0, n - 1 do
  local o = 2 + i * 7
  local id, uk = ARGV[o + 1], ARGV[o + 6]
  fresh[i] = not ids[id] and redis.call('EXISTS', ik(id)) == 0
  ids[id] = true
  if fresh[i] and uk ~= '' then
    if seen[uk] and seen[uk] ~= id then return {'dup', uk, seen[uk]} end
    seen[uk] = id
    local holder = redis.call('GET', P .. ':unique:' .. uk)
    if holder and holder ~= id then
      local st = redis.call('HGET', ik(holder), 'state')
      if st == 'pending' or st == 'delayed' or st == 'reserved' then
        return {'dup', uk, holder}
      end
    end
  end
end
local now = now_us()
local stored = 0
local flags = {}
for i = 0, n - 1 do
  local o = 2 + i * 7
  local id, q, uk, ttl = ARGV[o + 1], ARGV[o + 2], ARGV[o + 6], ARGV[o + 7]
  flags[i + 1] = fresh[i] and '1' or '0'
  if fresh[i] then
    redis.call('SET', jk(id), ARGV[o + 3])
    if uk ~= '' then
      if ttl ~= '' then
        redis.call('SET', P .. ':unique:' .. uk, id, 'PX', ttl)
      else
        redis.call('SET', P .. ':unique:' .. uk, id)
      end
    end
    redis.call('SADD', P .. ':queues', q)
    enqueue(id, q, now, tonumber(ARGV[o + 4]) - now, 'queue', q, 'attempts', '0', 'timeout', ARGV[o + 5],
            'ukey', uk)
    stored = stored + 1
  end
end
return {'ok', stored, table.concat(flags)}
