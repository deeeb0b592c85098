-- Limits (forge.limits, forge/backends/redis/limits.py): claims through per-queue parallelism,
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
--   handback: id, token.  Puts a claimed job back at the head of its queue, attempt un-counted
--            (also a claim the worker made ahead and will not run: supervisor.py).
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
  redis.call('HDEL', ik(id), 'token', 'claimed', 'deadline', 'ahead')
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
local function begin(id)
  return begin_attempt(id, redis.call('HGET', ik(id), 'timeout'), now, tonumber(ARGV[5]), tonumber(ARGV[6]),
                       tonumber(ARGV[7]), tonumber(ARGV[8]))
end

-- A claim sent again with its token (its reply was lost) gets the same job back, with the
-- slots it holds, as claim_next's does (the prelude's resumed: the same P:wclaim:<worker> key).
local rid, rinfo, rlease = resumed(worker, token)
if rid then
  local scopes = {}
  for _, n in ipairs(needs(rinfo[3], own_limits(rid))) do
    if n[1] == 's' and redis.call('ZSCORE', sk(n[2]), rid) then table.insert(scopes, n[2]) end
  end
  local reply = resumed_reply(rid, rinfo, rlease)
  table.insert(reply, cjson.encode(scopes))
  table.insert(reply, '[]')
  return reply
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
              local attempt, deadline, lease = begin(id)
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
                local reply = reserve(q, id, now, worker, token, attempt, deadline, lease)
                table.insert(reply, cjson.encode(scopes))
                table.insert(reply, cjson.encode(dropped))
                return reply
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
