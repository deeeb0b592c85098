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
local ids = {}
local fresh = {}
local checked = false
for i = 0, n - 1 do
  if ARGV[2 + i * 7 + 6] ~= '' then checked = true break end
end
if checked then
  -- A unique key in the batch: every check before any write (all or nothing).
  local seen = {}
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
end
local now = now_us()
local stored = 0
local flags = {}
for i = 0, n - 1 do
  local o = 2 + i * 7
  local id, q, uk, ttl = ARGV[o + 1], ARGV[o + 2], ARGV[o + 6], ARGV[o + 7]
  local new
  if checked then
    new = fresh[i]
    if new then redis.call('SET', jk(id), ARGV[o + 3]) end
  elseif ids[id] then
    new = false
  else
    -- No unique key to check first: the record's SET NX is the existence check (the job's
    -- record and info are written and deleted together). A record without its info (a run cut
    -- short between the two writes) is no job: it is written again.
    ids[id] = true
    new = redis.call('SET', jk(id), ARGV[o + 3], 'NX') ~= false
    if not new and redis.call('EXISTS', ik(id)) == 0 then
      redis.call('SET', jk(id), ARGV[o + 3])
      new = true
    end
  end
  flags[i + 1] = new and '1' or '0'
  if new then
    if uk ~= '' then
      if ttl ~= '' then
        redis.call('SET', P .. ':unique:' .. uk, id, 'PX', ttl)
      else
        redis.call('SET', P .. ':unique:' .. uk, id)
      end
    end
    local due = tonumber(ARGV[o + 4])
    if due - now <= 0 then
      -- enqueue's due branch, with the queue listed (P:queues) when its pending list was
      -- empty: a queue with a waiting, running or kept job is listed already (forget_queue
      -- unlists only a queue without any), so the set holds it while it holds jobs.
      promote(q, now)
      if redis.call('RPUSH', qk(q, 'pending'), id) == 1 then redis.call('SADD', P .. ':queues', q) end
      redis.call('HSET', ik(id), 'state', 'pending', 'avail', us(now), 'queue', q, 'attempts', '0',
                 'timeout', ARGV[o + 5], 'ukey', uk)
      notify(q)
    else
      redis.call('SADD', P .. ':queues', q)
      enqueue(id, q, now, due - now, 'queue', q, 'attempts', '0', 'timeout', ARGV[o + 5], 'ukey', uk)
    end
    stored = stored + 1
  end
end
return {'ok', stored, table.concat(flags)}
