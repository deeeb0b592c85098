-- The prelude: the constants and helpers every other script of this directory shares. Not a
-- script of its own. On Redis 7+ forge/backends/redis/lua.py makes one Functions library of it
-- and every script (loaded once per server with FUNCTION LOAD, each script a function called
-- with FCALL), so the helpers are defined once, not on every call; on an older server each
-- script is sent (EVAL, then EVALSHA) after a copy of it.
-- Before it, lua.py puts one line per constant the scripts share: `local PROMOTE_BATCH = <n>`
-- (due delayed jobs moved per promotion), and the prefix P (ARGV[1] of every call; a function
-- sets it as it starts).
-- KEYS: none (every key is built from the prefix, so Redis Cluster is not supported).
-- ARGV[1]: the key prefix P, in every script. Key layout: forge/backends/redis/layout.py.
-- Numbers cross the Lua boundary as strings of integer microseconds: Lua's tostring would
-- round a timestamp to 14 digits. Times are the server's (TIME).
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
local function free_unique(id, uk)
  -- uk: the job's ukey field if the caller read it already (false: none), else it is read here.
  if uk == nil then uk = redis.call('HGET', ik(id), 'ukey') end
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
  local info = redis.call('HMGET', ik(id), 'state', 'token', 'queue', 'ukey')
  if info[1] ~= 'reserved' or info[2] ~= token then return 0 end
  local q = info[3]
  local rk = qk(q, 'reserved')
  if only_expired == '1' then
    local lease = tonumber(redis.call('ZSCORE', rk, id))
    if lease and lease > now then return 0 end
  end
  redis.call('ZREM', rk, id)
  if mode == 'done' and keep_done ~= '1' then
    -- Deleted in this same step: the claim's fields and the event would go with it unseen.
    free_unique(id, info[4])
    drop(id)
    return 1
  end
  redis.call('HDEL', ik(id), 'token', 'claimed', 'deadline', 'ahead')
  if event ~= '' then redis.call('APPEND', jk(id), event) end
  if mode == 'release' then
    redis.call('HSET', ik(id), 'attempts', attempts)
    enqueue(id, q, now, delay)
    return 1
  end
  free_unique(id, info[4])
  redis.call('ZADD', qk(q, mode), us(now), id)
  redis.call('HSET', ik(id), 'state', mode, 'at', us(now))
  return 1
end
local function resumed(worker, token)
  -- The job a claim sent again with its token took (its reply was lost: a crash, a timeout),
  -- if that claim still holds: id, its info (state, token, queue, attempts, claimed, deadline)
  -- and its lease; else nil. P:wclaim:<worker> names the worker's last claim.
  local last = redis.call('GET', P .. ':wclaim:' .. worker)
  if last and string.sub(last, 1, #token + 1) == token .. ' ' then
    local id = string.sub(last, #token + 2)
    local info = redis.call('HMGET', ik(id), 'state', 'token', 'queue', 'attempts', 'claimed', 'deadline')
    if info[1] == 'reserved' and info[2] == token then
      local lease = redis.call('ZSCORE', qk(info[3], 'reserved'), id)
      if lease then return id, info, lease end
    end
  end
  return nil
end
local function resumed_reply(id, info, lease)
  -- A claim's reply for what resumed found: {claimed_us, id, record, attempt, deadline_us, lease_us}.
  return {info[5], id, redis.call('GET', jk(id)), tonumber(info[4]), info[6], us(tonumber(lease))}
end
local function begin_attempt(id, timeout, now, default_timeout, grace, margin, window)
  -- Count an attempt of job id (its timeout field: timeout); returns attempt, deadline, lease.
  local attempt = redis.call('HINCRBY', ik(id), 'attempts', 1)
  local deadline = now + (tonumber(timeout) or default_timeout) + grace
  return attempt, deadline, now + math.min(window, deadline - now + margin)
end
local function reserve(q, id, now, worker, token, attempt, deadline, lease)
  -- Reserve job id (taken off q's pending list) for the claim (worker, token): the claim's
  -- reply {now_us, id, record, attempt, deadline_us, lease_us}.
  redis.call('HSET', ik(id), 'state', 'reserved', 'token', token, 'claimed', us(now), 'deadline', us(deadline))
  redis.call('ZADD', qk(q, 'reserved'), us(lease), id)
  redis.call('SET', P .. ':wclaim:' .. worker, token .. ' ' .. id, 'EX', 86400)
  redis.call('APPEND', jk(id), '{"event":"claimed","attempt":' .. attempt .. ',"at":' ..
             secs(now) .. ',"worker":' .. worker .. ',"deadline":' .. secs(deadline) ..
             ',"log_offset":' .. redis.call('STRLEN', P .. ':log:' .. id) .. '}\n')
  return {us(now), id, redis.call('GET', jk(id)), attempt, us(deadline), us(lease)}
end
local function claim_next(now, worker, token, default_timeout, grace, margin, window, args, first, ahead)
  -- Claim the first due job of the queues args[first..] (the caller's own ARGV, passed in: a
  -- script run as a function of a larger one sees only its part); see claim for the reply. A
  -- claim sent again with its token (its reply was lost) gets the same job back (resumed).
  -- ahead: a claim made while the worker's current job runs (ack_claim): the job's info gets
  -- ahead = token until the worker says it started (ack_claim's started), so recovery can
  -- tell a claim that never ran (released uncounted) from one that did. A job marked noahead
  -- (recovered so once: it may kill its worker) is never claimed ahead: it is put back at the
  -- head and nothing is claimed (the worker claims it plainly after its current job).
  local rid, rinfo, rlease = resumed(worker, token)
  if rid then
    if ahead then redis.call('HSET', ik(rid), 'ahead', token) else redis.call('HDEL', ik(rid), 'ahead') end
    return resumed_reply(rid, rinfo, rlease)
  end
  for i = first, #args do
    local q = args[i]
    if redis.call('SISMEMBER', P .. ':paused', q) == 0 then
      promote(q, now)
      local pk = qk(q, 'pending')
      while true do
        local id = redis.call('LPOP', pk)
        if not id then break end
        local info = redis.call('HMGET', ik(id), 'state', 'timeout', 'noahead')
        if info[1] == 'pending' then
          if ahead and info[3] then
            redis.call('LPUSH', pk, id)
            return {us(now)}
          end
          local attempt, deadline, lease = begin_attempt(id, info[2], now, default_timeout, grace, margin, window)
          if ahead then redis.call('HSET', ik(id), 'ahead', token) end
          return reserve(q, id, now, worker, token, attempt, deadline, lease)
        end
      end
    end
  end
  return {us(now)}
end
