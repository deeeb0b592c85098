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
