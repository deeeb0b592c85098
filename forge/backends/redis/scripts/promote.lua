-- Move a queue's due delayed jobs to the tail of its pending list.
-- KEYS: none.
-- ARGV[1]: P; ARGV[2]: queue.
-- Returns how many were moved.
return promote(ARGV[2], now_us())
