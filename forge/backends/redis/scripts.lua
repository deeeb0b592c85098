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
  if redis.call('LLEN', k) < 8 then redis.call('RPUSH', k, '1') end
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
local function enqueue(id, q, now, delay, ...)
  -- ...: more field, value pairs for the job's info hash, set in the same HSET.
  if delay <= 0 then
    promote(q, now)
    redis.call('RPUSH', qk(q, 'pending'), id)
    redis.call('HSET', ik(id), 'state', 'pending', 'avail', us(now), ...)
  else
    redis.call('ZADD', qk(q, 'delayed'), us(now + delay), id)
    redis.call('HSET', ik(id), 'state', 'delayed', 'avail', us(now + delay), ...)
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

local function finish_job(now, id, token, mode, event, attempts, delay, keep_done, only_expired)
  -- End the claim (id, token) as mode (done|release|failed); 1 if it held, else 0. See finish.
  local info = redis.call('HMGET', ik(id), 'state', 'token', 'queue')
  if info[1] ~= 'reserved' or info[2] ~= token then return 0 end
  local q = info[3]
  local rk = qk(q, 'reserved')
  if only_expired == '1' then
    local lease = tonumber(redis.call('ZSCORE', rk, id))
    if lease and lease > now then return 0 end
  end
  redis.call('ZREM', rk, id)
  redis.call('HDEL', ik(id), 'token', 'claimed', 'deadline')
  if event ~= '' then redis.call('APPEND', jk(id), event) end
  if mode == 'release' then
    redis.call('HSET', ik(id), 'attempts', attempts)
    enqueue(id, q, now, delay)
    return 1
  end
  free_unique(id)
  if mode == 'done' and keep_done ~= '1' then
    drop(id)
    return 1
  end
  redis.call('ZADD', qk(q, mode), us(now), id)
  redis.call('HSET', ik(id), 'state', mode, 'at', us(now))
  return 1
end
local function claim_next(now, worker, token, default_timeout, grace, margin, window, first)
  -- Claim the first due job of the queues ARGV[first..]; see claim for the reply. A claim
  -- sent again with its token (its reply was lost: a crash, a timeout) gets the same job back.
  local wk = P .. ':wclaim:' .. worker
  local last = redis.call('GET', wk)
  if last and string.sub(last, 1, #token + 1) == token .. ' ' then
    local id = string.sub(last, #token + 2)
    local info = redis.call('HMGET', ik(id), 'state', 'token', 'queue', 'attempts', 'claimed', 'deadline')
    if info[1] == 'reserved' and info[2] == token then
      local lease = redis.call('ZSCORE', qk(info[3], 'reserved'), id)
      if lease then
        return {info[5], id, redis.call('GET', jk(id)), tonumber(info[4]), info[6], us(tonumber(lease))}
      end
    end
  end
  for i = first, #ARGV do
    local q = ARGV[i]
    if redis.call('SISMEMBER', P .. ':paused', q) == 0 then
      promote(q, now)
      local pk = qk(q, 'pending')
      while true do
        local id = redis.call('LPOP', pk)
        if not id then break end
        local info = redis.call('HMGET', ik(id), 'state', 'timeout')
        if info[1] == 'pending' then
          local attempt = redis.call('HINCRBY', ik(id), 'attempts', 1)
          local eff = tonumber(info[2]) or default_timeout
          local deadline = now + eff + grace
          local lease = now + math.min(window, deadline - now + margin)
          redis.call('HSET', ik(id), 'state', 'reserved', 'token', token,
                     'claimed', us(now), 'deadline', us(deadline))
          redis.call('ZADD', qk(q, 'reserved'), us(lease), id)
          redis.call('SET', wk, token .. ' ' .. id, 'EX', 86400)
          redis.call('APPEND', jk(id), '{"event":"claimed","attempt":' .. attempt .. ',"at":' ..
                     secs(now) .. ',"worker":' .. worker .. ',"deadline":' .. secs(deadline) ..
                     ',"log_offset":' .. redis.call('STRLEN', P .. ':log:' .. id) .. '}\n')
          return {us(now), id, redis.call('GET', jk(id)), attempt, us(deadline), us(lease)}
        end
      end
    end
  end
  return {us(now)}
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

-- @script claim
-- Claim the first due job of the first unpaused queue that has one, fenced by a token.
-- KEYS: none.
-- ARGV[1]: P; ARGV[2]: worker (a JSON string); ARGV[3]: token; ARGV[4]: default_timeout_us;
--   ARGV[5]: grace_us; ARGV[6]: margin_us; ARGV[7]: window_us; ARGV[8..]: queue names.
-- Returns {now_us} when nothing is due, else {now_us, id, record, attempt, deadline_us, lease_us}.
return claim_next(now_us(), ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5]),
                  tonumber(ARGV[6]), tonumber(ARGV[7]), 8)

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
return finish_job(now_us(), ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[7]), ARGV[8],
                  ARGV[9])

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

-- @script ack_claim
-- Acknowledge a claim (finish's 'done') and claim the next job, in one step: a worker draining
-- a queue makes one round trip per job. The claim is made whether or not the ack held.
-- KEYS: none.
-- ARGV[1]: P; ARGV[2]: id; ARGV[3]: token; ARGV[4]: the done event line; ARGV[5]: attempts;
--   ARGV[6]: keep_done ('1': keep done jobs for the retention); ARGV[7..12]: claim's ARGV[2..7]
--   (worker, new token, default_timeout_us, grace_us, margin_us, window_us); ARGV[13..]: queues.
-- Returns {acked (1|0), then claim's reply}.
local now = now_us()
local acked = finish_job(now, ARGV[2], ARGV[3], 'done', ARGV[4], ARGV[5], 0, ARGV[6], '0')
local reply = claim_next(now, ARGV[7], ARGV[8], tonumber(ARGV[9]), tonumber(ARGV[10]),
                         tonumber(ARGV[11]), tonumber(ARGV[12]), 13)
table.insert(reply, 1, acked)
return reply

-- @script limits
-- Limits (forge.limits, forge/backends/_redislimits.py): claims through per-queue parallelism,
-- rates and per-key concurrency, isolation locks, and their holds. One script with an
-- operation name, so its helpers are written once. Keys (S: a scope, as in forge.limits.spec):
--   P:lim:s:<S>  ZSET  the scope's held slots: member = holder (a job id, or run:<token> for a
--                      direct run's isolation lock), score = lease expiry (us); renewed with the
--                      job's lease, so a dead holder's slot frees when its lease runs out
--   P:lim:r:<S>  STRING  a rate's theoretical arrival time (us, GCRA), PX past it
--   P:lim:w:<S>  SET   queues with a job waiting for the scope: notified when a slot frees
--   P:lim:scopes SET   every scope used (for queue:limits)
-- ARGV[1]: P; ARGV[2]: operation; the rest depends on it:
--   claim:   worker (JSON), token, default_timeout_us, grace_us, margin_us, window_us,
--            config (JSON, LimitsConfig.to_wire), scan_max, queue names...
--            Returns {now} (nothing due), {now, 'blocked', wake_us or ''} (due jobs held back),
--            or {now, id, record, attempt, deadline_us, lease_us, scopes (JSON), dropped (JSON)}.
--            Sent again with its token (a lost reply), it answers with the job it took (P:wclaim).
--   release: holder, scopes...  Frees the slots and notifies one waiting worker per queue.
--   handback: id, token.  Puts a claimed job back at the head of its queue, attempt un-counted.
--   renew:   holder, lease_us, scopes...  Moves the slots' leases on (only those still held).
--   lock:    holder, lease_us (from now), scope, max.  Returns {1} or {0, holders...}.
--   state:   scopes...  Returns per scope: {holders (JSON: [member, lease_us]...), tat_us or ''}.
local op = ARGV[2]
local now = now_us()
local function sk(s) return P .. ':lim:s:' .. s end
local function rk(s) return P .. ':lim:r:' .. s end
local function wk(s) return P .. ':lim:w:' .. s end
local function live(s)
  local k = sk(s)
  redis.call('ZREMRANGEBYSCORE', k, '-inf', us(now))
  return redis.call('ZCARD', k)
end

if op == 'release' then
  local holder = ARGV[3]
  for i = 4, #ARGV do
    if redis.call('ZREM', sk(ARGV[i]), holder) == 1 then
      for _, q in ipairs(redis.call('SMEMBERS', wk(ARGV[i]))) do notify(q) end
      redis.call('DEL', wk(ARGV[i]))
    end
  end
  return 1
end

if op == 'handback' then
  -- A job a plain claim took, put back at the head of its queue with its attempt un-counted.
  local id, tok = ARGV[3], ARGV[4]
  local info = redis.call('HMGET', ik(id), 'state', 'token', 'queue')
  if info[1] ~= 'reserved' or info[2] ~= tok then return 0 end
  redis.call('ZREM', qk(info[3], 'reserved'), id)
  redis.call('HDEL', ik(id), 'token', 'claimed', 'deadline')
  redis.call('HINCRBY', ik(id), 'attempts', -1)
  redis.call('LPUSH', qk(info[3], 'pending'), id)
  redis.call('HSET', ik(id), 'state', 'pending')
  notify(info[3])
  return 1
end

if op == 'renew' then
  local holder, lease = ARGV[3], ARGV[4]
  for i = 5, #ARGV do redis.call('ZADD', sk(ARGV[i]), 'XX', lease, holder) end
  return 1
end

if op == 'lock' then
  local holder, lease, s, max = ARGV[3], tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6])
  redis.call('SADD', P .. ':lim:scopes', s)
  if live(s) >= max then
    local out = {0}
    for _, m in ipairs(redis.call('ZRANGE', sk(s), 0, -1)) do table.insert(out, m) end
    return out
  end
  redis.call('ZADD', sk(s), us(now + lease), holder)
  return {1}
end

if op == 'state' then
  local out = {us(now)}
  for i = 3, #ARGV do
    local s = ARGV[i]
    live(s)
    local h = redis.call('ZRANGE', sk(s), 0, -1, 'WITHSCORES')
    table.insert(out, cjson.encode(h))
    table.insert(out, redis.call('GET', rk(s)) or '')
  end
  return out
end

-- op == 'claim'
local worker, token = ARGV[3], ARGV[4]
local cfg = cjson.decode(ARGV[9])
local scan_max = tonumber(ARGV[10])
local function str(x) return type(x) == 'string' and x or nil end
local function num(x) return type(x) == 'number' and x or nil end
local function keycfg(k)
  local e = cfg.k[k]
  if e then return e end
  for _, p in ipairs(cfg.pat) do
    if string.match(k, p[1]) then return p[2] end
  end
  return nil
end
local function own_limits(id)
  local l = redis.call('HGET', ik(id), 'lim')
  if l then
    if l == '' then return nil end
    return cjson.decode(l)
  end
  local rec = redis.call('GET', jk(id))
  local own = nil
  if rec then
    local nl = string.find(rec, '\n', 1, true)
    local ok, j = pcall(cjson.decode, string.sub(rec, 1, (nl or (#rec + 1)) - 1))
    if ok and type(j) == 'table' and type(j.metadata) == 'table' and type(j.metadata['forge.limits']) == 'table' then
      own = j.metadata['forge.limits']
    end
  end
  redis.call('HSET', ik(id), 'lim', own and cjson.encode(own) or '')
  return own
end
-- The holds a job needs: {kind ('s' slot | 'r' rate), scope, max | interval_us, burst, label, drop}
local function needs(q, own)
  local out = {}
  local qc = cfg.q[q]
  if qc then
    if num(qc.p) then table.insert(out, {'s', 'p:' .. q, qc.p, 0, 'parallel ' .. q}) end
    if num(qc.ri) then table.insert(out, {'r', 'pr:' .. q, qc.ri, qc.rb, 'rate ' .. q}) end
  end
  if own then
    local ck = str(own.concurrency_key)
    if ck then
      local n = num(own.concurrency)
      if not n then local kc = keycfg(ck); n = kc and num(kc.c) end
      if n then table.insert(out, {'s', 'c:' .. ck, n, 0, 'concurrency ' .. ck}) end
    end
    local rkey = str(own.rate_key)
    if rkey then
      local ri, rb = num(own.rate_us), num(own.burst)
      if not ri then
        local kc = keycfg(rkey)
        if kc then ri, rb = num(kc.ri), num(kc.rb) end
      end
      if ri then table.insert(out, {'r', 'r:' .. rkey, ri, rb or 1, 'rate ' .. rkey}) end
    end
    local iso = str(own.isolation)
    if iso then table.insert(out, {'s', 'i:' .. iso, 1, 0, 'isolation ' .. iso, own.on_busy == 'drop'}) end
  end
  return out
end
-- The first hold that cannot be taken now: {need, wake_us or nil}, or nil when all can.
local function check(ns)
  for _, n in ipairs(ns) do
    if n[1] == 's' then
      if live(n[2]) >= n[3] then return {n, nil} end
    else
      local tat = tonumber(redis.call('GET', rk(n[2])) or '0')
      local allowed = tat - ((n[4] or 1) - 1) * n[3]
      if allowed > now then return {n, allowed} end
    end
  end
  return nil
end
local function take(ns, holder, lease)
  local scopes = {}
  for _, n in ipairs(ns) do
    redis.call('SADD', P .. ':lim:scopes', n[2])
    if n[1] == 's' then
      redis.call('ZADD', sk(n[2]), us(lease), holder)
      table.insert(scopes, n[2])
    else
      local tat = tonumber(redis.call('GET', rk(n[2])) or '0')
      local new = math.max(tat, now) + n[3]
      redis.call('SET', rk(n[2]), us(new), 'PX', math.floor((new - now) / 1000) + 60000)
    end
  end
  return scopes
end
local function begin(q, id)
  local attempt = redis.call('HINCRBY', ik(id), 'attempts', 1)
  local eff = tonumber(redis.call('HGET', ik(id), 'timeout')) or tonumber(ARGV[5])
  local deadline = now + eff + tonumber(ARGV[6])
  local lease = now + math.min(tonumber(ARGV[8]), deadline - now + tonumber(ARGV[7]))
  return attempt, deadline, lease
end

-- A claim sent again with its token (its reply was lost) gets the same job back, with the
-- slots it holds, as claim_next's does (the same P:wclaim:<worker> key).
local wck = P .. ':wclaim:' .. worker
local last = redis.call('GET', wck)
if last and string.sub(last, 1, #token + 1) == token .. ' ' then
  local id = string.sub(last, #token + 2)
  local info = redis.call('HMGET', ik(id), 'state', 'token', 'queue', 'attempts', 'claimed', 'deadline')
  local lease = info[1] == 'reserved' and info[2] == token and redis.call('ZSCORE', qk(info[3], 'reserved'), id)
  if lease then
    local scopes = {}
    for _, n in ipairs(needs(info[3], own_limits(id))) do
      if n[1] == 's' and redis.call('ZSCORE', sk(n[2]), id) then table.insert(scopes, n[2]) end
    end
    return {info[5], id, redis.call('GET', jk(id)), tonumber(info[4]), info[6], us(tonumber(lease)),
            cjson.encode(scopes), '[]'}
  end
end

local wake = nil
local blocked_any = false
local dropped = {}
for i = 11, #ARGV do
  local q = ARGV[i]
  if redis.call('SISMEMBER', P .. ':paused', q) == 0 then
    promote(q, now)
    local pk = qk(q, 'pending')
    local blocked = {}
    local pos, scanned = 0, 0
    while scanned < scan_max do
      local ids = redis.call('LRANGE', pk, pos, pos + 99)
      if #ids == 0 then break end
      local removed = 0
      for _, id in ipairs(ids) do
        scanned = scanned + 1
        if redis.call('HGET', ik(id), 'state') == 'pending' then
          local ns = needs(q, own_limits(id))
          local skip = false
          for _, n in ipairs(ns) do
            if blocked[n[2]] and not n[6] then skip = true; break end
          end
          if not skip then
            local why = check(ns)
            if why and not why[1][6] then
              blocked[why[1][2]] = true
              blocked_any = true
              redis.call('SADD', wk(why[1][2]), q)
              if why[2] and (not wake or why[2] < wake) then wake = why[2] end
            else
              redis.call('LREM', pk, 1, id)
              removed = removed + 1
              local attempt, deadline, lease = begin(q, id)
              if why then
                -- isolation held by another run, on_busy=drop: recorded as failed, not run
                redis.call('APPEND', jk(id), '{"event":"failed","attempt":' .. attempt .. ',"at":' ..
                           secs(now) .. ',"worker":' .. worker .. ',"reason":"isolated","error":' ..
                           cjson.encode(why[1][5] .. ' was held by another run; dropped (on_busy=drop)') .. '}\n')
                free_unique(id)
                redis.call('ZADD', qk(q, 'failed'), us(now), id)
                redis.call('HSET', ik(id), 'state', 'failed', 'at', us(now))
                table.insert(dropped, id)
              else
                local scopes = take(ns, id, lease)
                redis.call('HSET', ik(id), 'state', 'reserved', 'token', token,
                           'claimed', us(now), 'deadline', us(deadline))
                redis.call('ZADD', qk(q, 'reserved'), us(lease), id)
                redis.call('SET', wck, token .. ' ' .. id, 'EX', 86400)
                redis.call('APPEND', jk(id), '{"event":"claimed","attempt":' .. attempt .. ',"at":' ..
                           secs(now) .. ',"worker":' .. worker .. ',"deadline":' .. secs(deadline) ..
                           ',"log_offset":' .. redis.call('STRLEN', P .. ':log:' .. id) .. '}\n')
                return {us(now), id, redis.call('GET', jk(id)), attempt, us(deadline), us(lease),
                        cjson.encode(scopes), cjson.encode(dropped)}
              end
            end
          end
        end
      end
      pos = pos + #ids - removed
    end
  end
end
if blocked_any then return {us(now), 'blocked', wake and us(wake) or '', cjson.encode(dropped)} end
return {us(now), '', '', cjson.encode(dropped)}

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
