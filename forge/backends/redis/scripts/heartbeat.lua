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
