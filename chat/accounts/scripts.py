"""The Lua scripts of the quota counters in Redis (chat/accounts/counters.py runs them): each is atomic and one
round trip, and each that changes counters records its answer under the call's own id (the last key), so a
call sent again after a reset answers the same and changes nothing.

The **seed markers**: one per principal and day, one per principal and month, each holding a random token
(the counters' *epoch*). A marker is set only by `SEED`, with the counters of its period rebuilt from the
database (chat/accounts/seeding.py), so a missing marker means the counters of that period were never
seeded here: a new period, or a Redis that restarted empty or failed over to a replica that had not caught up.
"""

# Admission: check every limit against what is used, then add the message and its reservation, or
# nothing. KEYS: the four counters, the day's and the month's seed markers, then the call's record. ARGV:
# their four limits (0: none), the messages (1, or 0 for a reservation grown at its turn), tokens and
# nano-dollars to add, the TTLs of a minute's, a day's and a month's counter, 1 to admit whether or not
# the counters are seeded (0: a missing marker answers {-1, day missing, month missing} and changes
# nothing), then the record's TTL. Answers {refused (0: none, else the counter's number), the four counters
# before, the day's and the month's epoch ('-': unseeded)}. Run twice with the same record (a retry after
# the reply was lost), it answers what it answered the first time and adds nothing.
ADMIT = """
local done = redis.call('GET', KEYS[7])
if done then
  local found = {}
  for n in string.gmatch(done, '%S+') do table.insert(found, n) end
  return found
end
local raw = redis.call('MGET', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6])
if ARGV[11] == '0' and (not raw[5] or not raw[6]) then
  return {-1, raw[5] and 0 or 1, raw[6] and 0 or 1}
end
local need = {tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[7])}
local ttl = {ARGV[8], ARGV[9], ARGV[9], ARGV[10]}
local used = {}
for i = 1, 4 do raw[i] = raw[i] or '0'; used[i] = tonumber(raw[i]) end
local refused = 0
for i = 1, 4 do
  local limit = tonumber(ARGV[i])
  if limit > 0 and used[i] + need[i] > limit then
    refused = i
    break
  end
end
if refused == 0 then
  for i = 1, 4 do
    if need[i] ~= 0 then
      redis.call('INCRBY', KEYS[i], need[i])
      if redis.call('TTL', KEYS[i]) < 0 then redis.call('EXPIRE', KEYS[i], ttl[i]) end
    end
  end
end
local answer = {refused, raw[1], raw[2], raw[3], raw[4], raw[5] or '-', raw[6] or '-'}
redis.call('SET', KEYS[7], table.concat(answer, ' '), 'EX', ARGV[12])
return answer
"""


# Seeding: the counters of the periods whose marker is missing are raised to what the database recorded (to
# the larger of the two: a deployment that adopts the markers with its counters intact keeps them, and an
# admission made meanwhile is not counted twice), and the marker is set, in one step: two processes seeding
# at once count it once. KEYS: the four counters, the day's and the month's seed markers. ARGV: the
# database's four figures, 1 to seed the day (its minute too) and 1 to seed the month (0: its figures were
# not read), the three TTLs, then the new epoch. Answers the two markers as they now are.
SEED = """
local function raise(key, value, ttl)
  if value > tonumber(redis.call('GET', key) or '0') then
    redis.call('SET', key, value, 'KEEPTTL')
    if redis.call('TTL', key) < 0 then redis.call('EXPIRE', key, ttl) end
  end
end
if ARGV[5] == '1' and redis.call('EXISTS', KEYS[5]) == 0 then
  raise(KEYS[1], tonumber(ARGV[1]), ARGV[7])
  raise(KEYS[2], tonumber(ARGV[2]), ARGV[8])
  raise(KEYS[3], tonumber(ARGV[3]), ARGV[8])
  redis.call('SET', KEYS[5], ARGV[10], 'EX', ARGV[8])
end
if ARGV[6] == '1' and redis.call('EXISTS', KEYS[6]) == 0 then
  raise(KEYS[4], tonumber(ARGV[4]), ARGV[9])
  redis.call('SET', KEYS[6], ARGV[10], 'EX', ARGV[9])
end
return redis.call('MGET', KEYS[5], KEYS[6])
"""


# Settlement or release: add the differences (never below 0); mark and report a money counter that passed
# 80% of its limit, once a period. KEYS: the four counters, the two "warned" marks, the two seed markers (and,
# for a kept reservation, its session's records), then the call's record. ARGV: the message, token and
# nano-dollar differences, the day's and month's limits to warn at (0: none), the three TTLs, the day's and
# the month's epoch the reservation was admitted under ('' when unknown: the differences are added), the
# tokens and nano-dollars the turn cost in all (and the record's field and the fence it must be under:
# otherwise another holder adopted it, or it was settled already, and nothing changes), then the call's
# record's TTL. A counter whose marker holds another epoch lost the reservation with its Redis and was rebuilt
# from the database without this turn (not saved yet): it is added what the turn cost in all; one whose marker
# is missing is left alone (its rebuild, to come, reads the turn from the database). Run twice with the same
# record, it answers what it answered the first time and changes nothing.
ADJUST = """
local once = KEYS[#KEYS]
local done = redis.call('GET', once)
if done then
  local found = {}
  for n in string.gmatch(done, '%S+') do table.insert(found, tonumber(n)) end
  return found
end
if #KEYS > 9 then
  local record = redis.call('HGET', KEYS[9], ARGV[13])
  if not record or tonumber(string.sub(record, 1, string.find(record, ' ', 1, true) - 1)) ~= tonumber(ARGV[14]) then
    return {}
  end
  redis.call('HDEL', KEYS[9], ARGV[13])
end
local delta = {tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[3])}
local full = {0, tonumber(ARGV[11]), tonumber(ARGV[12]), tonumber(ARGV[12])}
local epoch = {ARGV[9], ARGV[9], ARGV[9], ARGV[10]}
local marks = redis.call('MGET', KEYS[7], KEYS[8])
local marker = {marks[1], marks[1], marks[1], marks[2]}
local ttl = {ARGV[6], ARGV[7], ARGV[7], ARGV[8]}
local limits = {tonumber(ARGV[4]), tonumber(ARGV[5])}
local total = {0, 0, 0, 0}
for i = 1, 4 do
  if epoch[i] ~= '' and epoch[i] ~= marker[i] then
    delta[i] = marker[i] and full[i] or 0
  end
  if delta[i] ~= 0 then
    local n = redis.call('INCRBY', KEYS[i], delta[i])
    if n < 0 then
      redis.call('SET', KEYS[i], 0, 'KEEPTTL')
      n = 0
    end
    if redis.call('TTL', KEYS[i]) < 0 then redis.call('EXPIRE', KEYS[i], ttl[i]) end
    total[i] = n
  elseif i > 2 and limits[i - 2] > 0 then
    total[i] = tonumber(redis.call('GET', KEYS[i]) or '0')
  end
end
local crossed = {}
for j = 1, 2 do
  local i = j + 2
  if limits[j] > 0 and total[i] * 5 >= limits[j] * 4 and redis.call('SET', KEYS[4 + j], 1, 'NX', 'EX', ttl[i]) then
    table.insert(crossed, i - 1)
    table.insert(crossed, total[i])
  end
end
local record = {}
for k, n in ipairs(crossed) do record[k] = string.format('%d', n) end
redis.call('SET', once, table.concat(record, ' '), 'EX', ARGV[#ARGV])
return crossed
"""


# A queued message's reservation, recorded: one hash per session, a field per message, "<fence> <record>".
# KEYS: the hash, then the call's record. ARGV: the field, the fence, the record, the hash's TTL, then the
# call's record's TTL. Run twice with the same record, it writes nothing (the record it wrote may have been
# settled, and so deleted, meanwhile).
KEEP = """
if redis.call('SET', KEYS[2], 1, 'NX', 'EX', ARGV[5]) then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ' ' .. ARGV[3])
  redis.call('EXPIRE', KEYS[1], ARGV[4])
end
"""

# A new holder adopts the records its predecessors left: those under an older fence move to its own; those
# already under its own come again (so a retry after the reply was lost finds what the first call took: each
# is settled once all the same, `ADJUST` deleting the record under that fence).
# KEYS: the hash. ARGV: the new fence, then the fields (none: all). Returns field, record, field, record...
ADOPT = """
local fields = {}
for i = 2, #ARGV do fields[i - 1] = ARGV[i] end
if #ARGV == 1 then fields = redis.call('HKEYS', KEYS[1]) end
local adopted = {}
for _, field in ipairs(fields) do
  local value = redis.call('HGET', KEYS[1], field)
  if value then
    local space = string.find(value, ' ', 1, true)
    if tonumber(string.sub(value, 1, space - 1)) <= tonumber(ARGV[1]) then
      local record = string.sub(value, space + 1)
      redis.call('HSET', KEYS[1], field, ARGV[1] .. ' ' .. record)
      table.insert(adopted, field)
      table.insert(adopted, record)
    end
  end
end
return adopted
"""
