-- forge's Redis backend: the server-side scripts (loaded by forge/backends/_redis_helpers.py).
--
-- Each script starts at a line `-- @script <name>`; the comment lines right after that marker
-- document it and are not sent to the server. Every script runs with the `prelude` section
-- prepended, so it can use P and the helpers defined there. Key layout: see the docstring of
-- forge/backends/redis.py.
--
-- Numbers cross the Lua boundary as strings of integer microseconds: Lua's tostring would
-- round a timestamp to 14 digits. Times are the server's (TIME).

-- @script prelude
-- Shared by every script below (prepended to each one before it is registered): the key
-- helpers, the server clock and the state transitions the scripts have in common.
-- KEYS: none (every key is built from the prefix, so Redis Cluster is not supported).
-- ARGV[1]: the key prefix P, in every script.
-- PROMOTE_BATCH is replaced with the Python constant of that name before registration.
if redis.replicate_commands then redis.replicate_commands() end
local P = ARGV[1]
local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local function us(x) return string.format('%d', x) end
local function secs(x)
  return string.format('%d.%06d', math.floor(x / 1000000), x % 1000000)
end
local function qk(q, what) return P .. ':q:' .. q .. ':' .. what end
local function ik(id) return P .. ':info:' .. id end
local function jk(id) return P .. ':job:' .. id end
local function notify(q)
  local k = qk(q, 'notify')
  redis.call('RPUSH', k, '1')
  redis.call('LTRIM', k, -8, -1)
end
local function promote(q, now)
  local dk = qk(q, 'delayed')
  local due = redis.call('ZRANGEBYSCORE', dk, '-inf', us(now), 'LIMIT', 0, PROMOTE_BATCH)
  if #due == 0 then return 0 end
  local pk = qk(q, 'pending')
  for _, id in ipairs(due) do
    redis.call('ZREM', dk, id)
    redis.call('RPUSH', pk, id)
    redis.call('HSET', ik(id), 'state', 'pending')
  end
  return #due
end
local function enqueue(id, q, now, delay)
  if delay <= 0 then
    promote(q, now)
    redis.call('RPUSH', qk(q, 'pending'), id)
    redis.call('HSET', ik(id), 'state', 'pending', 'avail', us(now))
  else
    redis.call('ZADD', qk(q, 'delayed'), us(now + delay), id)
    redis.call('HSET', ik(id), 'state', 'delayed', 'avail', us(now + delay))
  end
  notify(q)
end
local function free_unique(id)
  local uk = redis.call('HGET', ik(id), 'ukey')
  if uk and uk ~= '' then
    local k = P .. ':unique:' .. uk
    if redis.call('GET', k) == id then redis.call('DEL', k) end
  end
end
local function drop(id)
  redis.call('DEL', jk(id), ik(id), P .. ':log:' .. id)
end

-- @script push
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
    redis.call('HSET', ik(id), 'queue', q, 'attempts', '0', 'timeout', ARGV[o + 5], 'ukey', uk)
    if uk ~= '' then
      if ttl ~= '' then
        redis.call('SET', P .. ':unique:' .. uk, id, 'PX', ttl)
      else
        redis.call('SET', P .. ':unique:' .. uk, id)
      end
    end
    redis.call('SADD', P .. ':queues', q)
    enqueue(id, q, now, tonumber(ARGV[o + 4]) - now)
    stored = stored + 1
  end
end
return {'ok', stored, table.concat(flags)}

-- @script claim
-- Claim the first due job of the first unpaused queue that has one, fenced by a token.
-- KEYS: none.
-- ARGV[1]: P; ARGV[2]: worker (a JSON string); ARGV[3]: token; ARGV[4]: default_timeout_us;
--   ARGV[5]: grace_us; ARGV[6]: margin_us; ARGV[7]: window_us; ARGV[8..]: queue names.
-- Returns {now_us} when nothing is due, else {now_us, id, record, attempt, deadline_us, lease_us}.
local now = now_us()
for i = 8, #ARGV do
  local q = ARGV[i]
  if redis.call('SISMEMBER', P .. ':paused', q) == 0 then
    promote(q, now)
    local pk = qk(q, 'pending')
    while true do
      local id = redis.call('LPOP', pk)
      if not id then break end
      if redis.call('HGET', ik(id), 'state') == 'pending' then
        local attempt = redis.call('HINCRBY', ik(id), 'attempts', 1)
        local eff = tonumber(redis.call('HGET', ik(id), 'timeout')) or tonumber(ARGV[4])
        local deadline = now + eff + tonumber(ARGV[5])
        local lease = now + math.min(tonumber(ARGV[7]), deadline - now + tonumber(ARGV[6]))
        redis.call('HSET', ik(id), 'state', 'reserved', 'token', ARGV[3],
                   'claimed', us(now), 'deadline', us(deadline))
        redis.call('ZADD', qk(q, 'reserved'), us(lease), id)
        redis.call('APPEND', jk(id), '{"event":"claimed","attempt":' .. attempt .. ',"at":' ..
                   secs(now) .. ',"worker":' .. ARGV[2] .. ',"deadline":' .. secs(deadline) .. '}\n')
        return {us(now), id, redis.call('GET', jk(id)), attempt, us(deadline), us(lease)}
      end
    end
  end
end
return {us(now)}

-- @script heartbeat
-- Extend a claim's lease (never past its deadline plus the margin, never shortening it).
-- KEYS: none.
-- ARGV[1]: P; ARGV[2]: id; ARGV[3]: token; ARGV[4]: margin_us; ARGV[5]: window_us.
-- Returns {now_us} when the claim no longer holds, else {now_us, lease_us}.
local id = ARGV[2]
local now = now_us()
local info = redis.call('HMGET', ik(id), 'state', 'token', 'queue', 'deadline')
if info[1] ~= 'reserved' or info[2] ~= ARGV[3] then return {us(now)} end
local rk = qk(info[3], 'reserved')
local cur = tonumber(redis.call('ZSCORE', rk, id))
if not cur then return {us(now)} end
local lease = now + math.min(tonumber(ARGV[5]), tonumber(info[4]) + tonumber(ARGV[4]) - now)
if lease > cur then redis.call('ZADD', rk, 'XX', us(lease), id) else lease = cur end
return {us(now), us(lease)}

-- @script finish
-- End a claim: done (ack), release (back to the queue after a delay) or failed.
-- KEYS: none.
-- ARGV[1]: P; ARGV[2]: id; ARGV[3]: token; ARGV[4]: mode (done|release|failed);
--   ARGV[5]: event line or ''; ARGV[6]: attempts; ARGV[7]: delay_us; ARGV[8]: keep_done
--   ('1': keep done jobs for the retention); ARGV[9]: only_expired ('1': only if the lease
--   has run out, for recovering abandoned claims).
-- Returns 1 if the claim held and was finished, else 0.
local id = ARGV[2]
local info = redis.call('HMGET', ik(id), 'state', 'token', 'queue')
if info[1] ~= 'reserved' or info[2] ~= ARGV[3] then return 0 end
local q, now, mode = info[3], now_us(), ARGV[4]
local rk = qk(q, 'reserved')
if ARGV[9] == '1' then
  local lease = tonumber(redis.call('ZSCORE', rk, id))
  if lease and lease > now then return 0 end
end
redis.call('ZREM', rk, id)
redis.call('HDEL', ik(id), 'token', 'claimed', 'deadline')
if ARGV[5] ~= '' then redis.call('APPEND', jk(id), ARGV[5]) end
if mode == 'release' then
  redis.call('HSET', ik(id), 'attempts', ARGV[6])
  enqueue(id, q, now, tonumber(ARGV[7]))
  return 1
end
free_unique(id)
if mode == 'done' and ARGV[8] ~= '1' then
  drop(id)
  return 1
end
redis.call('ZADD', qk(q, mode), us(now), id)
redis.call('HSET', ik(id), 'state', mode, 'at', us(now))
return 1

-- @script fetch
-- Read jobs for inspection in one atomic step.
-- KEYS: none.
-- ARGV[1]: P; ARGV[2..]: ids.
-- Returns {now_us, then per id: state, attempts, updated_us, sort key (us), record}, with
--   state and record '' when the job is missing. The sort key is the one listings are ordered
--   by: due time while waiting, claim time while reserved, finish time once done or failed.
local now = now_us()
local out = {us(now)}
for i = 2, #ARGV do
  local id = ARGV[i]
  local info = redis.call('HMGET', ik(id), 'state', 'attempts', 'avail', 'claimed', 'at')
  local rec = redis.call('GET', jk(id))
  local st, updated, key = info[1], '', info[3] or '0'
  if not st or not rec then
    st, rec = '', ''
  elseif st == 'delayed' and tonumber(info[3]) <= now then
    st = 'pending'
  elseif st == 'reserved' then
    updated = info[4] or ''
    key = updated
  elseif st == 'done' or st == 'failed' then
    updated = info[5] or ''
    key = updated
  end
  table.insert(out, st)
  table.insert(out, info[2] or '0')
  table.insert(out, updated)
  table.insert(out, key)
  table.insert(out, rec)
end
return out

-- @script stats
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

-- @script retry
-- Put a failed job back at the tail of its queue with its attempts reset, taking its unique
-- key back in the same step; refused while another live job holds the key (a key whose ttl
-- has passed is gone, so free).
-- KEYS: none.
-- ARGV[1]: P; ARGV[2]: id; ARGV[3]: the 'retried' event line; ARGV[4]: ttl_ms of the unique
--   key, or ''.
-- Returns 1 if the job was failed and is now pending, 0 if it was not failed, or
--   {'dup', holder id} if another live job holds its unique key (it stays failed).
local id = ARGV[2]
local info = redis.call('HMGET', ik(id), 'state', 'queue', 'ukey')
if info[1] ~= 'failed' then return 0 end
local uk = info[3]
if uk and uk ~= '' then
  local k = P .. ':unique:' .. uk
  local holder = redis.call('GET', k)
  if holder and holder ~= id then
    local st = redis.call('HGET', ik(holder), 'state')
    if st == 'pending' or st == 'delayed' or st == 'reserved' then return {'dup', holder} end
  end
  if ARGV[4] ~= '' then
    redis.call('SET', k, id, 'PX', ARGV[4])
  else
    redis.call('SET', k, id)
  end
end
local now = now_us()
redis.call('ZREM', qk(info[2], 'failed'), id)
redis.call('APPEND', jk(id), ARGV[3])
redis.call('HSET', ik(id), 'attempts', '0')
redis.call('HDEL', ik(id), 'at')
enqueue(id, info[2], now, 0)
return 1

-- @script delete
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

-- @script clear
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

-- @script promote
-- Move a queue's due delayed jobs to the tail of its pending list.
-- KEYS: none.
-- ARGV[1]: P; ARGV[2]: queue.
-- Returns how many were moved.
return promote(ARGV[2], now_us())

-- @script append_log
-- Append captured output to a job's log, capped.
-- KEYS: none.
-- ARGV[1]: P; ARGV[2]: id; ARGV[3]: data; ARGV[4]: cap (bytes).
-- Returns 0.
local k = P .. ':log:' .. ARGV[2]
local room = tonumber(ARGV[4]) - redis.call('STRLEN', k)
if room > 0 then redis.call('APPEND', k, string.sub(ARGV[3], 1, room)) end
return 0

-- @script cancel
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

-- @script stats_journal
-- Journal one attempt's outcome (forge/stats/redisjournal.py): the record appended to its
-- minute's string (which stops growing at ARGV[4] bytes and expires after ARGV[5] seconds),
-- and the running totals. With a job id it records only while the job is reserved under the
-- claim's token ARGV[12]: run just before `finish` in one script (forge/stats/redisjournal.py
-- builds it from the two), that is exactly when the finish takes effect.
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
end
redis.pcall('EXPIRE', mk, ARGV[5])
redis.pcall('HINCRBY', tk, ARGV[6], 1)
for i = 7, 9, 2 do
  if ARGV[i] ~= '' then
    redis.pcall('HINCRBY', tk, ARGV[i], 1)
    redis.pcall('HINCRBYFLOAT', tk, string.match(ARGV[i], '^(.*|)') .. 'sum', ARGV[i + 1])
  end
end
return 1
