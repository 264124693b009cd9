-- Every call the Redis users store makes, one atomic script call each (see store.py).
--
-- KEYS[1] the user row (hash: name, rpm, tpm); KEYS[2] its request window; KEYS[3] its token
-- window. A window is a hash of bucket number -> amount, the algorithm of
-- extproc/users/sliding_window.py. The three keys share a {hash tag}, so Redis Cluster keeps
-- them in one slot. The time is Redis's own (TIME), so every gateway replica uses the same clock.
--
-- ARGV[1] the operation, ARGV[2] the bucket width in ms, ARGV[3] the number of buckets in the
-- window; further arguments depend on the operation.

local op = ARGV[1]
local bucket_ms = tonumber(ARGV[2])
local buckets = tonumber(ARGV[3])
local ttl_ms = (buckets + 1) * bucket_ms

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The amounts still in the window at bucket `current` and their total; older buckets are deleted.
local function load(key, current)
  local oldest = current - buckets
  local flat = redis.call('HGETALL', key)
  local amounts, total, expired = {}, 0, {}
  for i = 1, #flat, 2 do
    local bucket = tonumber(flat[i])
    if bucket < oldest then
      expired[#expired + 1] = flat[i]
    else
      local amount = tonumber(flat[i + 1])
      amounts[bucket] = amount
      total = total + amount
    end
  end
  if #expired > 0 then
    redis.call('HDEL', key, unpack(expired))
  end
  return amounts, total
end

-- Milliseconds until at least `excess` of the window's amount has left it.
local function retry_after(amounts, current, now, excess)
  local dropped = 0
  for bucket = current - buckets, current do
    dropped = dropped + (amounts[bucket] or 0)
    if dropped >= excess then
      return (bucket + buckets + 1) * bucket_ms - now
    end
  end
  return ttl_ms
end

if op == 'admit' then
  -- ARGV[4], ARGV[5]: the rpm and tpm for a name with no row, or '' to report it unknown.
  -- Returns {decision, limit exceeded, retry after ms, the user's tpm}; decision 0 admitted
  -- (and counted), 1 over RPM, 2 over TPM, 3 unknown. A rejection changes nothing.
  local row = redis.call('HMGET', KEYS[1], 'rpm', 'tpm')
  local rpm, tpm
  if row[1] then
    rpm, tpm = tonumber(row[1]), tonumber(row[2])
  elseif ARGV[4] ~= '' then
    rpm, tpm = tonumber(ARGV[4]), tonumber(ARGV[5])
  else
    return {3, 0, 0, 0}
  end
  local now = now_ms()
  local current = math.floor(now / bucket_ms)
  if rpm > 0 then
    local amounts, used = load(KEYS[2], current)
    if used >= rpm then
      return {1, rpm, retry_after(amounts, current, now, used - rpm + 1), tpm}
    end
  end
  if tpm > 0 then
    local amounts, used = load(KEYS[3], current)
    if used >= tpm then
      return {2, tpm, retry_after(amounts, current, now, used - tpm + 1), tpm}
    end
  end
  if rpm > 0 then
    redis.call('HINCRBY', KEYS[2], current, 1)
    redis.call('PEXPIRE', KEYS[2], ttl_ms)
  end
  return {0, 0, 0, tpm}
end

if op == 'charge' then
  -- ARGV[4]: tokens to add to the token window now.
  redis.call('HINCRBY', KEYS[3], math.floor(now_ms() / bucket_ms), ARGV[4])
  redis.call('PEXPIRE', KEYS[3], ttl_ms)
  return 1
end

if op == 'create' then
  -- ARGV[4..6]: name, rpm, tpm. Returns 0 when the user already exists.
  if redis.call('EXISTS', KEYS[1]) == 1 then
    return 0
  end
  redis.call('HSET', KEYS[1], 'name', ARGV[4], 'rpm', ARGV[5], 'tpm', ARGV[6])
  return 1
end

if op == 'read' then
  -- Returns the row's {rpm, tpm}, or nil if unknown.
  if redis.call('EXISTS', KEYS[1]) == 0 then
    return false
  end
  return redis.call('HMGET', KEYS[1], 'rpm', 'tpm')
end

if op == 'update' then
  -- ARGV[4], ARGV[5]: the new rpm and tpm, '' to keep one. Returns the row, or nil if unknown.
  if redis.call('EXISTS', KEYS[1]) == 0 then
    return false
  end
  if ARGV[4] ~= '' then
    redis.call('HSET', KEYS[1], 'rpm', ARGV[4])
  end
  if ARGV[5] ~= '' then
    redis.call('HSET', KEYS[1], 'tpm', ARGV[5])
  end
  return redis.call('HMGET', KEYS[1], 'rpm', 'tpm')
end

if op == 'delete' then
  -- Removes the row and its windows. Returns 0 when the user did not exist.
  if redis.call('DEL', KEYS[1]) == 0 then
    return 0
  end
  redis.call('DEL', KEYS[2], KEYS[3])
  return 1
end

return redis.error_reply('unknown operation ' .. tostring(op))
