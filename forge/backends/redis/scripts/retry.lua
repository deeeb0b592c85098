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
